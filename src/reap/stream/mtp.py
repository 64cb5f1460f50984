"""Multi-token-prediction (MTP) modules in calibration: their forward as the serving engines run it.

An MTP module is one more MoE decoder layer with a projection in front: for a sequence x_0..x_{T-1}
(teacher-forced prefill), with H the main model's last hidden states **after its final norm** (module k > 0:
the previous module's output after its final norm),

    U_t = proj(concat(norm_e(embed(x_{t+k+1})), norm_h(H_t)))        t = 0 .. T-k-2
    Y   = decoder_layer(U)                                           (causal, over the T-k-1 rows)
    next module's H = final_norm(Y);  its logits = lm_head(final_norm(Y))

with the names of :data:`reap.model.arch.MTP_STYLES` (DeepSeek-V3 / Kimi-K2 / GLM-4.5: ``enorm``, ``hnorm``,
``eh_proj``, ``shared_head.norm``; Qwen3-Next: ``pre_fc_norm_embedding``, ``pre_fc_norm_hidden``, ``fc``,
``norm``), the norms of the model's own RMSNorm class, and the decoder layer the main model's own class built by
transformers as layer num_hidden_layers + k. This is vLLM's ``DeepSeekMultiTokenPredictorLayer.forward``
(``deepseek_mtp.py``), ``Glm4MoeMultiTokenPredictorLayer.forward`` (``glm4_moe_mtp.py``) and
``Qwen3NextMultiTokenPredictor.forward`` (``qwen3_next_mtp.py``), SGLang's ``DeepseekModelNextN.forward``
(``deepseek_nextn.py``), ``Glm4MoeModelNextN.forward`` and ``Qwen3ForCausalLMMTP.forward``, and transformers'
``MtpLayer.forward`` (``modeling_layers.py``); the engines feed the main model's post-norm hidden states
(vLLM ``DeepseekV2Model.forward`` returns them after ``self.norm``; transformers' ``MTPCandidateGenerator`` reads
``hidden_states[-1]``, tied to the normed ``last_hidden_state``). vLLM alone zeroes the embedding at position 0
for DeepSeek/GLM (an open issue calls it a bug; SGLang and transformers do not): reap does not.

Each module's experts are computed and counted like any MoE layer's (:mod:`reap.stream.experts`); the statistics are rows
num_hidden_layers + k of the stats file.

Legend: B sequences in a batch, S padded length, H hidden.
"""

from __future__ import annotations

import torch

from reap.model.arch import build_config, build_model, extended_config
from reap.core.errors import UserError
from reap.stream.experts import ExpertsProbe, use_reap_experts


class MtpRunner:
    """Runs the MTP modules of a :class:`reap.stream.streamer.LayerStreamer`'s model after its last decoder layer."""

    def __init__(self, streamer):
        self.st = streamer
        layout = streamer.layout
        self.layout, self.style = layout, layout.mtp_style
        config = extended_config(streamer.ckpt.config, layout.mtp_layers)
        self.model = build_model(build_config(config), type(streamer.model), streamer.dtype)
        use_reap_experts(self.model)
        self.layers = self.model.get_submodule(layout.layers_path)
        text = self.model.config.get_text_config()
        self.norm_cls = type(streamer.text.norm)
        self.eps = getattr(text, "rms_norm_eps", 1e-6)
        self.hidden = text.hidden_size
        # the main layer whose call (masks, rotary embeddings) an MTP layer shares: the last main layer of its kind
        kinds = getattr(text, "layer_types", None)
        n = layout.num_layers
        self.twin = n - 1
        if kinds and len(kinds) > n:
            self.twin = max((i for i in range(n) if kinds[i] == kinds[n]), default=n - 1)

    # -- the module's pieces
    def _own(self, k: int) -> dict[str, torch.Tensor]:
        """Module k's projection and norms (stored beside its decoder layer), on the device."""
        prefix, style = self.layout.mtp_prefix(k), self.style
        names = {part: prefix + getattr(style, part) + ".weight" for part in ("embed_norm", "hidden_norm", "proj",
                                                                             "final_norm")}
        stored = [n for n in self.st.ckpt.infos if any(n == v or n.startswith(v[: -len("weight")]) for v in
                                                       names.values())]
        loader = self.st.loader
        state = loader.materialize(loader.reader.read(stored, device=self.st.device))
        missing = [v for v in names.values() if v not in state]
        if missing:
            raise UserError(f"MTP module {k}: no tensor {missing[0]}; the checkpoint's MTP module is incomplete")
        return {part: state[name].to(self.st.dtype) for part, name in names.items()}

    def _norm(self, weight: torch.Tensor) -> torch.nn.Module:
        """The model's own RMSNorm class (Qwen3-Next's is the (1 + w) kind) with this weight."""
        norm = self.norm_cls(self.hidden, eps=self.eps).to(device=self.st.device, dtype=self.st.dtype)
        with torch.no_grad():
            norm.weight.copy_(weight)
        return norm

    def _load_layer(self, k: int) -> torch.nn.Module:
        """Module k's decoder layer: transformers' layer num_hidden_layers + k of the extended model, loaded by its
        loader (stored MTP layer names spelled as the main layers' where the family stores them apart)."""
        from reap.stream.weights import load_into

        n = self.layout.num_layers + k
        names = self.st._stored.get(n, [])
        own, main = self.layout.mtp_layer_prefix(k), f"{self.layout.mtp_disk_layers}{n}."
        raw = self.st.loader.reader.read(names, device=self.st.device)
        state = self.st.loader.materialize(raw)
        state = {(main + key[len(own):] if key.startswith(own) else key): t for key, t in state.items()}
        missing = load_into(self.model, state, self.st.device, self.st.dtype, f"MTP module {k}")
        prefix = f"{self.layout.layers_path}.{n}."
        absent = sorted(m for m in missing if m.startswith(prefix))
        if absent:
            raise UserError(f"MTP module {k}: the checkpoint has no tensor for transformers' {absent[0]}")
        return self.layers[n]

    # -- running
    @torch.inference_mode()
    def run(self, k: int, accumulator=None) -> None:
        """MTP module k over every batch: statistics to ``accumulator``; the store then holds its normed output."""
        from reap.stream.hidden import Batch
        from reap.stream.observers import close_all, finish_all, start_all
        from reap.stream.weights import to_meta

        st = self.st
        own = self._own(k)
        enorm, hnorm, fnorm = self._norm(own["embed_norm"]), self._norm(own["hidden_norm"]), self._norm(own["final_norm"])
        proj = own["proj"]
        layer = self._load_layer(k)
        moe = self.layout.moe[self.layout.num_layers + k]
        experts = layer.get_submodule(moe.experts[len(f"{self.layout.layers_path}.{self.layout.num_layers + k}."):])
        experts._reap_probe = ExpertsProbe(accumulator)
        n = self.layout.num_layers + k
        observed: list = []
        embed = st.model.get_input_embeddings()
        try:
            # the observers, as for every MoE layer (reap.stream.streamer)
            observed = start_all(st.observers, st, n, layer, moe, experts, accumulator)
            for i, b in enumerate(st.batches):
                if k == 0:
                    out = st.final_output(i)
                    h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
                else:
                    h = st.store.get(i)
                shift = k + 1
                lengths = [max(n - shift, 0) for n in b.lengths]
                if b.ids.shape[1] <= shift:
                    st.store.put(i, h[:, :0])
                    continue
                shifted = Batch(b.ids[:, shift:], [max(n, 1) for n in lengths])  # attention needs a row to see
                ids = shifted.ids.to(st.device)
                u = torch.nn.functional.linear(torch.cat([enorm(embed(ids)), hnorm(h[:, : ids.shape[1]])], dim=-1),
                                               proj)
                args, kwargs = st.layer_call_for(shifted, self.twin)
                args = (u, *args[1:]) if args else args
                if not args:
                    kwargs = {**kwargs, "hidden_states": u}
                real = (torch.arange(ids.shape[1]).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)).reshape(-1)
                experts._reap_probe.token_mask = real.to(st.device) if not bool(real.all()) else None
                y = layer(*args, **kwargs)
                y = y[0] if isinstance(y, tuple) else y
                st.store.put(i, fnorm(y))
            finish_all(observed)
        finally:
            close_all(observed)
            del experts._reap_probe
            if st.device.type == "cuda":
                torch.cuda.current_stream(st.device).synchronize()
            to_meta(layer)
