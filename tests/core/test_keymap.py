"""The checkpoint key-table language (splice.core.keymap) and the standard adapter's published names (issue 13)."""

from __future__ import annotations

import pytest
import torch

from splice.adapters.cross_attention import STANDARD_PARAMS, StandardCrossAttention, StandardParams
from splice.core.errors import CheckpointError
from splice.core.keymap import DUPLICATE, OPS, Row, from_hf, to_hf
from splice.plugins import bert, gpt2

D = 4

# one row per op, each with its own tensors
TABLE = [
    Row("ln.weight", "norm.weight", (D,)),
    Row("fc.weight", "fc.weight", (D, 2 * D), "transpose"),
    Row("kv.bias", ("k.bias", "v.bias"), (2 * D,), "split"),
    Row("kv.weight", ("k.weight", "v.weight"), (D, 2 * D), "transpose_split"),
    Row(("q.weight", "k2.weight", "v2.weight"), "qkv.weight", (D, D), "fuse"),
    Row(("a.weight", "b.weight"), "ab.weight", (D, 3), "fuse", axis=1),
]


def _hf_sd() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {name: torch.randn(row.shape, generator=g) for row in TABLE for name in row.hf}


def test_every_op_round_trips():
    assert {row.op for row in TABLE} == set(OPS)
    sd = _hf_sd()
    ours, unused = from_hf(sd, TABLE, config="D=4")
    assert unused == []
    assert ours["fc.weight"].shape == (2 * D, D) and torch.equal(ours["fc.weight"], sd["fc.weight"].t())
    assert torch.equal(ours["k.bias"], sd["kv.bias"][:D]) and torch.equal(ours["v.bias"], sd["kv.bias"][D:])
    assert torch.equal(ours["v.weight"], sd["kv.weight"][:, D:].t())
    assert torch.equal(ours["qkv.weight"], torch.cat([sd["q.weight"], sd["k2.weight"], sd["v2.weight"]]))
    assert ours["ab.weight"].shape == (D, 6)
    back = to_hf(ours, TABLE, layout="Toy")
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    assert all(t.is_contiguous() for t in [*ours.values(), *back.values()])


def test_names_prefixes_duplicates_and_unused():
    sd = {"base." + k: v for k, v in _hf_sd().items()} | {"pooler.weight": torch.zeros(1), "tied": torch.zeros(1)}

    def name_of(key: str) -> str | None:
        return DUPLICATE if key == "tied" else key.removeprefix("base.")

    ours, unused = from_hf(sd, [row.prefixed(ours="m.") for row in TABLE], name_of)
    assert unused == ["pooler.weight"] and "m.qkv.weight" in ours
    back = to_hf(ours, [row.prefixed(hf="base.", ours="m.") for row in TABLE], layout="Toy")
    assert set(back) == {k for k in sd if k.startswith("base.")}
    assert all(torch.equal(back[k], sd[k]) for k in back)


def test_shape_error_names_the_tensor_the_shape_and_the_config():
    sd = _hf_sd() | {"kv.weight": torch.zeros(D, 2 * D + 1)}
    with pytest.raises(CheckpointError) as e:
        from_hf(sd, TABLE, config="hidden_size=4")
    assert all(s in str(e.value) for s in ("'kv.weight'", str((D, 2 * D + 1)), str((D, 2 * D)), "hidden_size=4",
                                           "fix:"))


def test_fuse_needs_every_part_of_one_shape():
    sd = _hf_sd()
    del sd["k2.weight"]
    with pytest.raises(CheckpointError, match="k2.weight: missing, but q.weight is there"):
        from_hf(sd, TABLE)
    unchecked = [Row(("q", "k", "v"), "qkv", op="fuse")]
    with pytest.raises(CheckpointError, match=r"q: shapes \(2, 2\), \(3, 2\), \(2, 2\)"):
        from_hf({"q": torch.zeros(2, 2), "k": torch.zeros(3, 2), "v": torch.zeros(2, 2)}, unchecked)
    with pytest.raises(CheckpointError, match="not a multiple of 3"):
        to_hf({"qkv": torch.zeros(4, 2)}, unchecked, layout="Toy")


def test_export_refuses_a_tensor_no_row_takes_and_a_partial_row():
    ours, _ = from_hf(_hf_sd(), TABLE)
    with pytest.raises(CheckpointError) as e:
        to_hf({**ours, "gate": torch.zeros(())}, TABLE, layout="Toy", fix="save in splice format")
    assert all(s in str(e.value) for s in ("'gate'", "Toy", "fix: save in splice format"))
    del ours["v.bias"]
    with pytest.raises(CheckpointError, match=r"cannot write 'kv.bias'.*\['v.bias'\] are missing"):
        to_hf(ours, TABLE, layout="Toy")
    with pytest.raises(CheckpointError, match="cannot write 'ln.weight'"):
        to_hf({}, TABLE, layout="Toy", required=True)
    assert to_hf({}, TABLE, layout="Toy") == {}
    with pytest.raises(CheckpointError, match="expected"):
        to_hf({**ours, "v.bias": torch.zeros(D), "norm.weight": torch.zeros(D + 1)}, TABLE, layout="Toy")


def test_a_row_says_when_its_op_does_not_fit_its_names():
    with pytest.raises(ValueError, match="not one of"):
        Row("a", "b", op="t")
    with pytest.raises(ValueError, match="split"):
        Row("a", "b", op="split")
    with pytest.raises(ValueError, match="fuse"):
        Row("a", ("b", "c"), op="fuse")


# ---- the standard adapter's names ----------------------------------------------------------------------------


def test_standard_params_are_the_adapter_state_dict():
    module = StandardCrossAttention(8, 2, 6, norm="post")
    assert list(STANDARD_PARAMS) == list(module.state_dict())
    no_bias = StandardCrossAttention(8, 2, 6, bias=False)
    assert set(no_bias.state_dict()) == {n for n in STANDARD_PARAMS if not n.endswith("_proj.bias")}


def _cross_names(table: list[Row], prefix: str) -> set[str]:
    return {name.removeprefix(prefix) for row in table for name in row.ours if name.startswith(prefix)}


_TABLES = {
    "gpt2": (lambda: gpt2._table({"n_embd": 8, "n_layer": 1, "vocab_size": 11, "n_positions": 5}),
             "h.0.crossattention."),
    "bert": (lambda: bert.LAYOUT.table({"hidden_size": 8, "num_hidden_layers": 1, "vocab_size": 11}),
             "layers.0.crossattention."),
}


@pytest.mark.parametrize("name", sorted(_TABLES))
def test_decoder_tables_spell_the_adapter_through_the_constant(name, monkeypatch):
    make, prefix = _TABLES[name]
    assert _cross_names(make(), prefix) == set(STANDARD_PARAMS)  # every adapter tensor has a place
    renamed = StandardParams(*(f"renamed_{n}" for n in STANDARD_PARAMS))
    monkeypatch.setattr({"gpt2": gpt2, "bert": bert}[name], "STANDARD_PARAMS", renamed)
    assert _cross_names(make(), prefix) == set(renamed)  # and the table follows the constant, no literal left
