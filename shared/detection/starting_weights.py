"""Starting weights of a detector (`init.from_run` / `init.weights`): the source's layers copied into the
detector by name. The backbone keeps the classification model's layer names, so every backbone layer must
be in the source with the same shapes; the pyramid and heads (`fpn_*`, `head_*`) are copied only from a
detection run whose shapes agree, otherwise they keep their fresh initialization.
"""

from __future__ import annotations


import keras

from shared import finetune, runs
from shared.config_schema import Config
from shared.detection.datasets import detection_normalization
from shared.detection.model import head_layer_names
from shared.errors import UserError
from shared.task import Rebuilt


def _normalization_note(source_run: runs.Run | None, config: Config) -> str:
    """A remark when the source run normalized its inputs otherwise than this run does: its backbone then
    sees inputs on another scale than the one it learned."""
    if source_run is None:
        return ""
    recorded = source_run.config_dict().get("data", {})
    if recorded.get("normalize", True) and (recorded.get("mean") is None or recorded.get("std") is None):
        return ""  # not recorded (the source's own statistics): nothing to compare
    mean, std = detection_normalization(config)
    if recorded.get("normalize", True) == config.data.normalize and recorded.get("mean") == mean \
            and recorded.get("std") == std:
        return ""
    return (f" (note: it normalized its inputs with mean {recorded.get('mean')} std {recorded.get('std')}, this "
            f"run with mean {mean} std {std}; set data.mean / data.std to match)")


def initialize_backbone(config: Config, detector: keras.Model, module, source: Rebuilt | None) -> str:
    """Copy init.from_run's (or init.weights') layers into `detector` by name (`source`: that run, rebuilt;
    None for a weight file of no run); returns the line for the run's notes. Every backbone layer must be in
    the source with the same shapes (else a UserError naming them and the differing hyperparameters);
    pyramid and head layers are copied where the source has them shaped alike (a detection run), else they
    keep their fresh initialization."""
    init, data, where = config.init, config.data, config.where
    input_shape = (data.image_size, data.image_size, data.channels)
    hparams = config.model.hparams
    key = f"init.from_run {init.from_run}" if init.from_run else f"init.weights {init.weights}"
    source_run = source.run if source is not None and init.from_run else None  # a classification or detection run
    with finetune.named_init(init, where):
        source = finetune.source_model(init, module, hparams, input_shape, source)
    head = head_layer_names(detector)
    matching = finetune.match_layers(source.model, detector, head)
    if matching.conflicts:
        raise UserError(f"{key}{where} does not fit this detector's backbone: {finetune.listed(matching.conflicts)}; "
                        f"{finetune.fix_suggestion(source, hparams, input_shape)}")
    finetune.copy_weights(source.model, detector, matching.copied)
    backbone = [name for name in matching.copied if name not in head]
    copied_head = [name for name in matching.copied if name in head]
    line = f"backbone weights from {source.description}: {len(backbone)} layers copied by name; "
    if copied_head:
        line += (f"pyramid and heads: {len(copied_head)} layers copied, {len(matching.reinitialized)} freshly "
                 f"initialized ({finetune.listed(matching.reinitialized, 3) or 'none'})")
    else:
        line += f"pyramid and heads freshly initialized ({len(matching.reinitialized)} layers)"
    return line + _normalization_note(source_run, config)
