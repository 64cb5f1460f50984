"""A checkpoint's :class:`reap.model.arch.Layout`: the model side (:mod:`reap.model.model_side`, transformers' meta model)
and the disk side (:mod:`reap.model.disk_side`, every stored tensor's role) put together, multi-token-prediction
modules included or left out.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from reap.model.arch import Layout, extended_config
from reap.model.disk_side import map_checkpoint, mtp_modules
from reap.model.model_side import derive_model

if TYPE_CHECKING:
    from reap.io.checkpoint import Checkpoint


def derive(ckpt: "Checkpoint", keep_mtp: bool = True) -> Layout:
    """The checkpoint's :class:`Layout`, every stored tensor with its role. Multi-token-prediction modules stored
    beside the decoder layers are kept as MoE layers after the last one (their decoder layer built by transformers
    as one more layer of the model), unless ``keep_mtp`` is False: then they are left out of pruned outputs."""
    return derive_with_model(ckpt, keep_mtp)[0]


def derive_with_model(ckpt: "Checkpoint", keep_mtp: bool = True):
    """:func:`derive` and transformers' meta model it maps the checkpoint onto (with the MTP modules' decoder layers
    as layers num_hidden_layers + k when they are kept)."""
    layout, model, _ = derive_model(ckpt.config)
    style, count, disk = mtp_modules(layout, ckpt.infos) if keep_mtp else (None, 0, "")
    if not count:
        return map_checkpoint(layout, model, ckpt), model
    wide, wide_model, _ = derive_model(extended_config(ckpt.config, count), type(model))
    mtp = replace(wide, num_layers=layout.num_layers, mtp_layers=count, mtp_style=style, mtp_disk_layers=disk,
                   mtp_keys=layout.mtp_keys)
    return map_checkpoint(mtp, wide_model, ckpt), wide_model
