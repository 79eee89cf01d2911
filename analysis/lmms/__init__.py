"""lmms-eval integration (``pip install "visipruner-analysis[lmms]"``): the ``visipruner`` model of lmms-eval.

lmms-eval 0.7 finds external models through the entry-point group ``lmms_eval.models``; this package's entry point
is ``manifest`` below, which names the model class without importing it, so ``lmms-eval`` starts as fast as without
the plugin and the class (``analysis.lmms.model.PrunedModel``) loads only when a run asks for ``--model visipruner``.
"""

from __future__ import annotations

from typing import Any

MODEL_ID = "visipruner"
MODEL_CLASS = "analysis.lmms.model.PrunedModel"


def manifest() -> Any:
    """The lmms-eval manifest registering the ``visipruner`` model (the entry point's payload)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=MODEL_CLASS)
