"""LLaMA decoder against transformers' ``LlamaForCausalLM`` (the oracle): logits for each attention layout and rotary
type, left padding, the KV cache, ``inputs_embeds``, greedy/beam/sampled tokens from splice's generation code against
transformers' ``generate``, the checkpoint mapping both ways (``from_pretrained`` reads the export), and LLaMA in the
encoder-decoder kind through the ``standard`` and ``gated`` adapters.

transformers' LLaMA has no cross-attention, so the shared checks with a context (``test_decoders.py``'s ``ALL``) do
not apply to it; the slot checks (``SLOTTED``) do, and the decoder-only parts of the others (mapping, validation,
inputs, registration) are here."""

from __future__ import annotations

import copy
import json
import re
from types import SimpleNamespace

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import save_file

import splice
import transformers  # the oracle only; src/ never imports it
from decoder_cases import ATOL, CASES, diff, padding_mask, save_hf
from splice.core.errors import CheckpointError, ConfigError, InputError
from splice.core.generation import KVCache, generate
from splice.core.interfaces import TextDecoder
from splice.core.plugins import get_registry
from splice.plugins import llama as L

CASE = CASES["llama"]
MEASURED: dict[str, float] = {}  # the largest differences seen, printed by test_print_measured (pytest -s)

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}
# each changes the oracle's config (on top of the case's tiny one: 4 query heads, 2 K/V heads, attention biases).
# llama3 at theta 10 with head_dim 8: wavelengths 6.3, 11, 20, 35 against 32/4 and 32/1, so one frequency is kept, two
# are blended and one is divided. dynamic: 12 tokens read past max_position_embeddings=8, so the base grows.
CONFIGS = {
    "gqa": {},
    "mha-tied": dict(num_key_value_heads=4, tie_word_embeddings=True, attention_bias=False),
    "mqa-head_dim-mlp_bias": dict(num_key_value_heads=1, head_dim=16, mlp_bias=True),
    "linear": dict(rope_scaling={"rope_type": "linear", "factor": 2.0}, rope_theta=500.0),
    "linear-legacy-type": dict(rope_scaling={"type": "linear", "factor": 4.0}),
    "dynamic": dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}, max_position_embeddings=8),
    "llama3": dict(rope_scaling=LLAMA3, rope_theta=10.0),
}
# generation: wider weights (initializer_range) so that tiny random models walk several distinct tokens
GEN = dict(initializer_range=0.3, bos_token_id=1, eos_token_id=None, pad_token_id=0)


def pair(tmp_path, seed: int = 0, **over):
    """(oracle, ours from its saved folder, config.json, tensors on disk)."""
    hf = CASE.hf_model(seed, **copy.deepcopy(over))  # transformers writes into a rope_scaling dict it is given
    cfg, sd = save_hf(hf, tmp_path)
    return hf, CASE.ours(cfg, sd), cfg, sd


def prompts(B: int = 3, T: int = 6, seed: int = 0) -> torch.Tensor:
    """(B, T) prompts that start with BOS (1), as a LLaMA tokenizer writes them; ids from 3 up."""
    ids = CASE.ids(B, T, seed).clamp(min=3)
    ids[:, 0] = 1
    return ids


# ---- parity ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CONFIGS))
@torch.no_grad()
def test_logits_match_transformers(name, tmp_path):
    hf, ours, cfg, _ = pair(tmp_path, seed=len(name), **CONFIGS[name])
    ids = CASE.ids(T=12)
    ref = hf(input_ids=ids).logits
    out = ours(ids)
    MEASURED[f"logits {name}"] = d = diff(out.logits, ref)
    assert out.logits.shape == ref.shape == (2, 12, 99) and d <= ATOL
    assert out.hidden_states.shape == (2, 12, 32)
    if "rope_scaling" in CONFIGS[name]:  # the scaling matters: plain rotary positions give other logits
        unscaled = {**L.config_from_hf(cfg), "rope_scaling": None, "max_position_embeddings": 64}
        plain = L.build_llama(L.LlamaConfig(**unscaled)).eval()
        plain.load_state_dict(ours.state_dict())
        assert diff(plain(ids).logits, ref) > 1e-3


@torch.no_grad()
def test_left_padding_changes_nothing(tmp_path):
    # with a mask and no position ids, positions count real tokens (transformers' generate); a left-padded row then
    # gives the logits of the same tokens unpadded, and matches transformers given those positions
    hf, ours, _, _ = pair(tmp_path, seed=4)
    ids, mask = CASE.ids(B=3, T=8), padding_mask("left")
    out = ours(ids, attention_mask=mask).logits
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    ref = hf(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    real = mask.bool()
    MEASURED["left-padded batch"] = d = diff(out[real], ref[real])
    assert d <= ATOL and torch.isfinite(out).all()
    for row in range(3):
        alone = hf(input_ids=ids[row:row + 1, real[row]]).logits[0]
        assert diff(out[row, real[row]], alone) <= ATOL
    assert diff(ours(ids, attention_mask=mask, position_ids=positions).logits[real], ref[real]) <= ATOL
    right = padding_mask("right")  # right padding: positions of the real tokens are 0, 1, ... anyway
    assert diff(ours(ids, attention_mask=right).logits[right.bool()], hf(input_ids=ids).logits[right.bool()]) <= ATOL


@pytest.mark.parametrize("chunks", [[1] * 9, [4, 1, 3, 1], [9]])
@pytest.mark.parametrize("padded", [False, True])
@torch.no_grad()
def test_kv_cache_matches_full_forward(plain_pair, chunks, padded):
    _, ours, _, _ = plain_pair
    ids = CASE.ids(T=9)
    mask = torch.ones(2, 9, dtype=torch.long)
    if padded:
        mask[0, :3] = 0
    full = ours(ids, attention_mask=mask if padded else None).logits
    cache, outs, start = KVCache(CASE.n_layers, max_len=16), [], 0
    for n in chunks:
        am = mask[:, :start + n] if padded else None
        outs.append(ours(ids[:, start:start + n], attention_mask=am, cache=cache).logits)
        start += n
    # the cache keeps the 2 key/value heads only
    assert cache.length == 9 and cache.k[0].shape == (2, 2, 16, 8)
    real = mask.bool()
    MEASURED["cache vs full"] = max(MEASURED.get("cache vs full", 0.0), d := diff(torch.cat(outs, 1)[real], full[real]))
    assert d <= ATOL


@torch.no_grad()
def test_inputs_embeds_and_position_ids(plain_pair):
    _, ours, _, _ = plain_pair
    ids = CASE.ids(T=7)
    embeds = ours.embed_tokens(ids)  # (B, T, D): what the prefix-LM kind splices image features into
    assert isinstance(ours.embed_tokens, torch.nn.Embedding)
    assert torch.equal(ours(inputs_embeds=embeds).logits, ours(ids).logits)
    # (B, T) explicit positions; rotary attention sees only their differences, so these are not evenly spaced
    gaps = torch.tensor([[0, 1, 2, 3, 10, 11, 12], [0, 2, 4, 6, 8, 10, 12]])
    assert torch.equal(ours(ids, position_ids=gaps).logits, ours(inputs_embeds=embeds, position_ids=gaps).logits)
    assert diff(ours(ids, position_ids=gaps).logits, ours(ids).logits) > 1e-3
    assert diff(ours(ids, position_ids=torch.arange(5, 12)).logits, ours(ids).logits) <= ATOL  # a shift: no change
    # a prompt read as embeddings, then ids one by one through the cache: the same as one pass
    cache = KVCache(CASE.n_layers, max_len=10)
    first = ours(inputs_embeds=embeds[:, :4], cache=cache).logits
    rest = [ours(ids[:, t:t + 1], cache=cache).logits for t in range(4, 7)]
    assert diff(torch.cat([first, *rest], 1), ours(ids).logits) <= ATOL


# ---- generation: splice's search loops drive LLaMA, against transformers' generate ----------------------


class DecoderOnly(torch.nn.Module):
    """``splice.core.generation`` drives an encoder-decoder model's decoder, passing the image context; this hands
    it LLaMA as a decoder-only kind does (an empty context, not passed on)."""

    def __init__(self, lm: L.LlamaDecoder):
        super().__init__()
        self.lm, self.vocab_size, self.max_positions = lm, lm.vocab_size, lm.max_positions

    def layer_specs(self):
        return self.lm.layer_specs()

    def forward(self, input_ids, context=None, attention_mask=None, cache=None):
        return self.lm(input_ids, attention_mask=attention_mask, cache=cache)


def splice_generate(lm, ids, mask=None, **options) -> list[list[int]]:
    B = ids.shape[0]
    model = SimpleNamespace(decoder=DecoderOnly(lm), tokens={"decoder_start": 1}, generation_defaults=None,
                            encoder_hidden=lambda px, enc: px, context=lambda h: h)
    return generate(model, torch.zeros(B, 0, lm.hidden_size), decoder_input_ids=ids, decoder_attention_mask=mask,
                    **options).tolist()


@pytest.fixture(scope="module")
def gen_pair(tmp_path_factory):
    """An oracle whose greedy rows end at different steps (EOS picked from what it generates), and ours."""
    hf, ours, _, _ = pair(tmp_path_factory.mktemp("llama-gen"), seed=2, **GEN)
    with torch.no_grad():
        free = hf.generate(input_ids=prompts(), max_new_tokens=10, do_sample=False, pad_token_id=0)[:, 6:]
    counts = torch.bincount(free[:, 1:].flatten(), minlength=99)  # a token most rows reach, not at once
    return hf, ours, int(counts.argmax())


@pytest.mark.parametrize("beams", [1, 3])
@pytest.mark.parametrize("padded", [False, True])
@torch.no_grad()
def test_generate_matches_transformers(gen_pair, beams, padded):
    hf, ours, eos = gen_pair
    ids, mask = prompts(), torch.ones(3, 6, dtype=torch.long)
    if padded:  # left padding, as a batch of prompts of different lengths is fed
        mask[1, :2], mask[2, :4] = 0, 0
        ids = ids.masked_fill(mask == 0, 0)
        ids[1, 2] = ids[2, 4] = 1  # each row's BOS after its padding
    kw = dict(max_new_tokens=10, num_beams=beams, eos_token_id=eos, pad_token_id=0)
    want = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, **kw)
    got = splice_generate(ours, ids, mask, **kw)
    assert got == want.tolist()
    assert want.shape[1] > 8 and len({tuple(r) for r in want.tolist()}) == 3  # a real search: rows differ
    if beams == 1:
        assert (want[:, 6:] == eos).any()  # some row ended early, so the padding after EOS is compared too


@torch.no_grad()
def test_sampling_matches_transformers(gen_pair):
    hf, ours, eos = gen_pair
    kw = dict(max_new_tokens=8, do_sample=True, top_k=20, temperature=0.8, eos_token_id=eos, pad_token_id=0)
    torch.manual_seed(7)
    want = hf.generate(input_ids=prompts(), **kw).tolist()
    torch.manual_seed(7)
    assert splice_generate(ours, prompts(), **kw) == want


# ---- the checkpoint mapping ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gqa", "mha-tied", "llama3"])
@torch.no_grad()
def test_export_reads_back_in_transformers(name, tmp_path):
    hf, ours, cfg, sd = pair(tmp_path / "hf", seed=5, **CONFIGS[name])
    values = L.LlamaConfig(**L.config_from_hf(cfg)).model_dump()
    hf_config = L.config_to_hf(values)
    back = L.state_dict_to_hf(ours.state_dict(), hf_config)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    out = tmp_path / "exported"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(hf_config))
    save_file(back, str(out / "model.safetensors"))
    again = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    assert again.config.rope_parameters == hf.config.rope_parameters
    ids = CASE.ids(T=12)
    MEASURED[f"export {name}"] = d = diff(again(input_ids=ids).logits, hf(input_ids=ids).logits)
    assert d <= ATOL


def test_mapping_reads_every_layout(plain_pair, tmp_path):
    _, ours, cfg, sd = plain_pair
    assert set(sd) == {k if k == "lm_head.weight" else f"model.{k}" for k in ours.state_dict()}
    # LlamaModel (no `model.`, no head) and a .bin-style tied head (the embedding again), and old rotary buffers
    base = {k.removeprefix("model."): v for k, v in sd.items() if k != "lm_head.weight"}
    mapped, unused = L.state_dict_from_hf(base, cfg)
    assert unused == [] and set(mapped) == set(ours.state_dict()) - {"lm_head.weight"}
    tied = {**cfg, "tie_word_embeddings": True}
    extra = {**sd, "model.layers.0.self_attn.rotary_emb.inv_freq": torch.zeros(4)}
    mapped, unused = L.state_dict_from_hf(extra, tied)
    assert "lm_head.weight" not in mapped and unused == ["model.layers.0.self_attn.rotary_emb.inv_freq"]
    assert any(re.fullmatch(p, unused[0]) for p in L.HF.ignorable)
    key, given, expected = CASE.bad_shape
    with pytest.raises(CheckpointError) as e:
        L.state_dict_from_hf({**sd, key: torch.zeros(given)}, cfg)
    assert all(s in str(e.value) for s in (key, str(given), str(expected)))
    with pytest.raises(CheckpointError, match="extra.weight"):
        L.state_dict_to_hf({**ours.state_dict(), "extra.weight": torch.zeros(1)}, cfg)


# ---- config ----------------------------------------------------------------------------------------------


def test_config_from_transformers_4_and_5():
    v5 = transformers.LlamaConfig(**CASE.tiny, rope_scaling=copy.deepcopy(LLAMA3), rope_theta=10.0).to_dict()
    assert "rope_parameters" in v5 and "rope_scaling" not in v5
    # transformers 4: rope_theta beside rope_scaling, whose type older files spell "type"
    legacy = {"type": "llama3", **{k: v for k, v in LLAMA3.items() if k != "rope_type"}}
    v4 = {**{k: v for k, v in v5.items() if k != "rope_parameters"}, "rope_theta": 10.0, "rope_scaling": legacy}
    kw = L.config_from_hf(v5)
    assert kw == L.config_from_hf(v4)
    assert kw["rope_theta"] == 10.0 and kw["rope_scaling"] == L.RopeScaling(**LLAMA3).model_dump()
    values = L.LlamaConfig(**kw).model_dump()
    assert L.config_from_hf(L.config_to_hf(values)) == values
    back = transformers.LlamaConfig(**{k: v for k, v in L.config_to_hf(values).items() if k != "model_type"})
    assert back.rope_parameters == {**LLAMA3, "rope_theta": 10.0}
    assert L.config_from_hf({**CASE.tiny, "pretraining_tp": 2})["rope_scaling"] is None  # ignored, as transformers 5


def test_config_validation():
    with pytest.raises(ValidationError, match="num_attention_heads=5 does not divide hidden_size=32.*fix"):
        L.LlamaConfig(hidden_size=32, num_attention_heads=5)
    with pytest.raises(ValidationError, match=r"num_key_value_heads=3 does not divide num_attention_heads=4.*\[1, 2"):
        L.LlamaConfig(**{**L.TINY, "num_key_value_heads": 3})
    with pytest.raises(ValidationError, match="head_dim=7 is odd.*fix"):
        L.LlamaConfig(**{**L.TINY, "head_dim": 7})
    with pytest.raises(ValidationError, match=r"rope_type='llama3' needs \['low_freq_factor', 'high_freq_factor'\]"):
        L.LlamaConfig(**L.TINY, rope_scaling={"rope_type": "llama3", "factor": 8.0})
    with pytest.raises(ValidationError, match="rope_type"):
        L.LlamaConfig(**L.TINY, rope_scaling={"rope_type": "yarn", "factor": 2.0})
    with pytest.raises(ValidationError, match="hidden_act"):
        L.LlamaConfig(hidden_act="tanh")
    with pytest.raises(ValidationError, match="n_layer"):
        L.LlamaConfig(n_layer=2)
    with pytest.raises(ConfigError) as e:
        L.config_from_hf({**CASE.tiny, "rope_scaling": {"rope_type": "longrope", "factor": 2.0}, "hidden_act": "tanh"})
    assert all(s in str(e.value) for s in ("rope_scaling.rope_type", "'longrope'", "hidden_act", "fix:"))
    c = L.LlamaConfig()
    assert (c.hidden_size, c.num_hidden_layers, c.rms_norm_eps, c.tie_word_embeddings, c.rope_theta) == \
        (4096, 32, 1e-6, False, 10000.0)


def test_bad_inputs(plain_pair):
    _, ours, _, _ = plain_pair
    ids = torch.full((1, 3), 5)
    for call, match in (
        (lambda: ours(), "exactly one.*neither"),
        (lambda: ours(ids, inputs_embeds=torch.zeros(1, 3, 32)), "exactly one.*both"),
        (lambda: ours(inputs_embeds=torch.zeros(1, 3, 16)), r"inputs_embeds must be .*\(B, T, 32\).*16"),
        (lambda: ours(inputs_embeds=torch.zeros(1, 3, 32, dtype=torch.long)), "inputs_embeds must be floating"),
        (lambda: ours(inputs_embeds=torch.zeros(1, 65, 32)), "exceeds max_position_embeddings=64"),
        (lambda: ours(ids, position_ids=torch.zeros(2, 3, dtype=torch.long)), r"position_ids must have shape"),
        (lambda: ours(ids, position_ids=torch.tensor([62, 63, 64])), "position_ids reach 64"),
        (lambda: ours(torch.tensor([[2, 99]])), r"\[0, 98\]"),
        (lambda: ours(ids, attention_mask=torch.ones(1, 4)), "attention_mask"),
        (lambda: ours(ids, context=torch.zeros(1, 4, 32)), "install an adapter"),
    ):
        with pytest.raises(InputError, match=match):
            call()
    # dynamic scaling reads up to factor x max_position_embeddings
    dyn = L.build_llama(L.LlamaConfig(**{**L.TINY, "max_position_embeddings": 8},
                                      rope_scaling={"rope_type": "dynamic", "factor": 2.0}))
    assert dyn.max_positions == 16 and dyn(torch.full((1, 16), 5)).logits.shape == (1, 16, 99)
    with pytest.raises(InputError, match="17 tokens"):
        dyn(torch.full((1, 17), 5))


def test_registration():
    entry = get_registry().get("decoder", "llama")
    assert entry.hf.model_types == ("llama",) and entry.config_cls.__name__ == "LlamaConfig" and entry.tiny == L.TINY
    assert get_registry().by_hf_model_type("decoder", "llama") is entry
    model = entry.builder(entry.config_cls(**entry.tiny))
    assert isinstance(model, TextDecoder) and model.native_cross_attention is False
    assert all(s.norm_kind == "rms" and s.norm == "pre" for s in model.layer_specs())


# ---- LLaMA in the encoder-decoder kind, through the adapters ---------------------------------------------


def spec(adapter: str) -> dict:
    return {"encoder": {"name": "vit", "config": {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 1,
                                                  "num_heads": 3}},
            "decoder": {"name": "llama", "config": dict(L.TINY)},
            # a gate away from 0, so that the image changes the captions
            "cross_attention": {"kind": adapter, **({"config": {"init_gate": 0.5}} if adapter == "gated" else {})},
            "tokens": {"decoder_start": 1, "pad": 0, "eos": 2}}


@pytest.mark.parametrize("adapter", ["standard", "gated"])
def test_encoder_decoder_through_adapters(adapter, tmp_path):
    plan = splice.validate(spec(adapter))
    assert plan.ok, plan.summary()
    model = splice.compose(spec(adapter), seed=0)
    assert model.enc_to_dec_proj is not None  # 48 -> 32
    slot = model.decoder.layers[0].crossattention
    assert isinstance(slot.norm, torch.nn.RMSNorm) and slot.q_proj.bias is None  # as the family: RMS, no bias
    g = torch.Generator().manual_seed(0)
    px, labels = torch.randn(2, 3, 32, 32, generator=g), torch.randint(3, 99, (2, 6), generator=g)
    out = model(pixel_values=px, labels=labels)
    out.loss.backward()
    assert torch.isfinite(out.loss) and slot.k_proj.weight.grad.abs().sum() > 0
    assert model.decoder.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0
    torch.optim.SGD(model.parameters(), lr=0.1).step()  # one training step lowers the loss on its batch
    with torch.no_grad():
        assert model(pixel_values=px, labels=labels).loss < out.loss
    model.eval()
    model.save_pretrained(tmp_path / "m")
    loaded = splice.load(tmp_path / "m")
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for beams in (1, 3):
        ids = model.generate(px, max_new_tokens=6, num_beams=beams)
        assert ids.shape[0] == 2 and ids.shape[1] > 1 and torch.equal(ids, loaded.generate(px, max_new_tokens=6,
                                                                                         num_beams=beams))
    with torch.no_grad():
        assert torch.equal(model(pixel_values=px, labels=labels).logits, loaded(pixel_values=px, labels=labels).logits)
    # transformers' LLaMA has no cross-attention (and no gated one anywhere)
    with pytest.raises(CheckpointError, match="LlamaForCausalLM" if adapter == "standard" else "'gated'"):
        splice.export_transformers(model, tmp_path / "hf")


def test_print_measured():
    print("\nmax abs differences:", {k: f"{v:.2e}" for k, v in sorted(MEASURED.items())})
