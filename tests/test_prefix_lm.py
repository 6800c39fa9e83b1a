"""The prefix-LM kind (issue 16, items 3-4) against transformers' LlavaForConditionalGeneration and
VipLlavaForConditionalGeneration on tiny random models (clip_vision's and llama's tiny configs, every weight
perturbed): logits, loss, greedy and beam tokens (a left-padded batch too), the folders both ways, the spec's
problems, gpt2 as the language model, training through ``splice.train``, freezing."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import splice
from oracle import perturb
from splice.core.errors import InputError, SpliceError
from splice.plugins.clip_vision import TINY as CLIP_TINY
from splice.plugins.gpt2 import TINY as GPT2_TINY
from splice.plugins.llama import TINY as LLAMA_TINY

transformers = pytest.importorskip("transformers")

IMAGE, PAD, BOS, EOS = 98, 0, 1, 2
TOKENS = {"image": IMAGE, "pad": PAD, "bos": BOS, "eos": EOS}
TEMPLATE = "{% for m in messages %}###{{ m['role'] }}: {{ m['content'] }}{% endfor %}###Assistant:"
# (model_type, extra config) -> image tokens per image: 4x4 patches, the class token dropped unless "full"
CASES = {"llava": ({}, 16), "vipllava": ({}, 16),
         "llava-full": ({"vision_feature_layer": [-1, 3], "vision_feature_select_strategy": "full"}, 17)}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: on a shared machine, thread hand-offs cost far more than the work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _hf_model(case: str):
    kind = case.split("-")[0]
    extra, _ = CASES[case]
    cls, config_cls = {"llava": (transformers.LlavaForConditionalGeneration, transformers.LlavaConfig),
                       "vipllava": (transformers.VipLlavaForConditionalGeneration, transformers.VipLlavaConfig)}[kind]
    vision = transformers.CLIPVisionConfig(**CLIP_TINY).to_dict()
    text = transformers.LlamaConfig(**LLAMA_TINY, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS).to_dict()
    torch.manual_seed(0)
    config = config_cls(vision_config=vision, text_config=text, image_token_index=IMAGE,
                        image_seq_length=CASES[case][1], **extra)
    return perturb(cls(config), seed=1, scale=0.05)


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    """(transformers model, splice model loaded from its folder, image tokens per image, the folder)."""
    hf = _hf_model(request.param)
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder)
    (folder / "chat_template.jinja").write_text(TEMPLATE)
    transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        folder)
    _tokenizer().save(str(folder / "tokenizer.json"))
    return hf, splice.load(folder), CASES[request.param][1], folder


def _tokenizer():
    """A word-level tokenizer over the tiny vocabulary: <pad> <s> </s>, words w3..w97, <image>."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": PAD, "<s>": BOS, "</s>": EOS, **{f"w{i}": i for i in range(3, IMAGE)}, "<image>": IMAGE}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


def _prompts(n_image: int, lengths=(3, 5), seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A left-padded batch: BOS, the image tokens, then ``lengths[i]`` text tokens; (ids, mask), each (B, T)."""
    g = torch.Generator().manual_seed(seed)
    rows = [[BOS] + [IMAGE] * n_image + torch.randint(3, 90, (n,), generator=g).tolist() for n in lengths]
    T = max(map(len, rows))
    ids = torch.tensor([[PAD] * (T - len(r)) + r for r in rows])
    return ids, (ids != PAD).long()


def _pixels(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_folder_reads_as_the_transformers_config_says(pair):
    hf, model, n_image, _ = pair
    spec = model.spec
    assert spec["kind"] == "prefix-lm"
    assert spec["vision"]["name"] == "clip_vision" and spec["language"]["name"] == "llama"
    assert spec["projector"]["kind"] == hf.config.model_type
    assert spec["vision_feature_layers"] == (list(hf.config.vision_feature_layer)
                                             if not isinstance(hf.config.vision_feature_layer, int)
                                             else hf.config.vision_feature_layer)
    assert model.tokens == TOKENS and model.image_seq_length == n_image
    assert model.chat_template == TEMPLATE
    assert model.tokenizer.token_to_id("<image>") == IMAGE
    assert model.image_processor.size == {"shortest_edge": 32} and model.image_processor.do_center_crop
    assert not model.loading_report.missing and not model.loading_report.unexpected


def test_logits_and_loss_match_transformers(pair):
    hf, model, n_image, _ = pair
    ids, _ = _prompts(n_image, lengths=(4, 4))
    px = _pixels(2)
    labels = ids.clone()
    labels[:, : 1 + n_image] = -100
    with torch.no_grad():
        want = hf(input_ids=ids, pixel_values=px, labels=labels)
        got = model(ids, px, labels=labels)
    diff = (got.logits - want.logits).abs().max().item()
    assert diff < 1e-4, diff
    assert abs(got.loss.item() - want.loss.item()) < 1e-5


@pytest.mark.parametrize("search", ["greedy", "beam", "sample"])
def test_generate_matches_transformers_left_padded(pair, search):
    """Greedy, beam search (3 beams) and sampling (the same global seed) on a batch of two prompts of different
    lengths, left-padded, then the longer prompt alone."""
    hf, model, n_image, _ = pair
    ids, mask = _prompts(n_image)
    px = _pixels(2, seed=1)
    options = dict(max_new_tokens=8, num_beams=3 if search == "beam" else 1, do_sample=search == "sample",
                   eos_token_id=EOS, pad_token_id=PAD)
    torch.manual_seed(3)
    want = hf.generate(input_ids=ids, attention_mask=mask, pixel_values=px, **options)
    torch.manual_seed(3)
    got = model.generate(input_ids=ids, attention_mask=mask, pixel_values=px, **options)
    assert torch.equal(got, want), (got, want)
    if search == "sample":
        return
    one = model.generate(input_ids=ids[1:], pixel_values=px[1:], **options)  # the unpadded row alone
    assert torch.equal(one, hf.generate(input_ids=ids[1:], pixel_values=px[1:], **options))


def test_export_is_read_by_transformers(pair, tmp_path):
    hf, model, n_image, _ = pair
    splice.export_transformers(model, tmp_path / "out")
    assert (tmp_path / "out" / "chat_template.jinja").read_text() == TEMPLATE
    processor = transformers.AutoImageProcessor.from_pretrained(tmp_path / "out")
    assert processor.size["shortest_edge"] == 32 and processor.crop_size["height"] == 32
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "out").convert_tokens_to_ids("<image>") == IMAGE
    again, info = type(hf).from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ids, _ = _prompts(n_image, lengths=(4, 4))
    with torch.no_grad():
        diff = (again.eval()(input_ids=ids, pixel_values=_pixels(2)).logits
                - hf(input_ids=ids, pixel_values=_pixels(2)).logits).abs().max().item()
    assert diff < 1e-5, diff


@pytest.mark.parametrize("layout", ["modules-5x", "legacy-4x"])
def test_other_weight_layouts_load(pair, tmp_path, layout):
    """transformers 5's module names (``model.language_model.*``, ``lm_head``), and 4.x's
    ``vision_tower.vision_model.*``."""
    hf, model, n_image, folder = pair
    tensors = load_file(folder / "model.safetensors")
    if layout == "modules-5x":
        renamed = {k: v.contiguous() for k, v in hf.state_dict().items()}
    else:
        renamed = {k.replace("vision_tower.", "vision_tower.vision_model.", 1): v for k, v in tensors.items()}
    save_file(renamed, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    other = splice.load(tmp_path)
    ids, _ = _prompts(n_image, lengths=(4, 4))
    with torch.no_grad():
        assert torch.equal(other(ids, _pixels(2)).logits, model(ids, _pixels(2)).logits)


def test_splice_folder_round_trip_keeps_the_chat_template(pair, tmp_path):
    _, model, n_image, _ = pair
    model.save_pretrained(tmp_path / "m")
    again = splice.load(tmp_path / "m")
    assert again.chat_template == TEMPLATE and again.tokens == TOKENS
    ids, _ = _prompts(n_image, lengths=(4, 4))
    with torch.no_grad():
        assert torch.equal(again(ids, _pixels(2)).logits, model(ids, _pixels(2)).logits)


def test_image_token_count_mismatch_names_both_counts(pair):
    _, model, n_image, _ = pair
    ids, _ = _prompts(n_image - 1, lengths=(4, 4))
    with pytest.raises(InputError, match=rf"hold {2 * (n_image - 1)} image token.*2 x {n_image} = {2 * n_image}"):
        model(ids, _pixels(2))
    with pytest.raises(InputError, match="pixel_values"):
        model(ids)


def test_chat_template_from_tokenizer_config(tmp_path):
    from splice.core.prefix_lm_format import read_chat_template

    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [
        {"name": "tool_use", "template": "x"}, {"name": "default", "template": TEMPLATE}]}))
    assert read_chat_template(tmp_path) == TEMPLATE
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "y"}))
    assert read_chat_template(tmp_path) == "y"


# ---- composing from a spec -----------------------------------------------------------------------------------


def _spec(**over) -> dict:
    spec = {"kind": "prefix-lm", "vision": {"name": "clip_vision", "config": dict(CLIP_TINY)},
            "language": {"name": "llama", "config": dict(LLAMA_TINY)}, "projector": "vipllava",
            "tokens": dict(TOKENS)}
    spec.update(over)
    return spec


def _problems(spec: dict) -> dict[str, str]:
    plan = splice.validate(spec)
    return {p.path: str(p) for p in plan.problems}


def test_defaults_and_summary():
    plan = splice.validate(_spec())
    assert plan.ok, plan.summary()
    assert plan.resolved_spec()["vision_feature_layers"] == [-2, -5, -8, -11, 6]
    assert "projector    vipllava: 80 -> 32" in plan.summary() and "image tokens 16 per image" in plan.summary()
    plan = splice.validate(_spec(projector={"kind": "llava", "config": {"act": "silu"}}))
    assert plan.ok and plan.resolved_spec()["vision_feature_layers"] == -2
    assert plan.resolved_spec()["projector"] == {"kind": "llava", "config": {"act": "silu", "bias": True}}


def test_spec_problems_name_the_field():
    from splice.core.plugins import get_registry

    both = _problems(_spec(tokens={"pad": PAD}, vision_feature_layers=[-2, 11]))  # every problem at once
    assert {"tokens.image", "vision_feature_layers"} <= set(both), both
    assert "tokens.image" in _problems(_spec(tokens={**TOKENS, "image": 500}))
    assert "tokens.pad" in _problems(_spec(tokens={**TOKENS, "pad": IMAGE}))
    swin = {"name": "swin", "config": get_registry().get("encoder", "swin").tiny}
    assert "token counts differ" in _problems(_spec(vision=swin, vision_feature_layers=[1, 2]))["vision_feature_layers"]
    bad = _problems(_spec(vision_feature_layers=[-2, 11]))
    assert "index(es) [11] do not exist" in bad["vision_feature_layers"] and "-11..10" in bad["vision_feature_layers"]
    assert "projector" in _problems(_spec(projector="mpl"))  # did-you-mean mlp
    assert "projector.config.act" in _problems(_spec(projector={"kind": "llava", "config": {"act": "tanh"}}))
    assert "freeze.0" in _problems(_spec(freeze=["decoder"]))
    assert "language.name" in _problems(_spec(language={"name": "bart_decoder", "config": {}}))


def test_projector_width_mismatch_is_a_problem(monkeypatch):
    """The composer owns the widths: a projection that does not build what it is asked for is refused by name."""
    from splice.core.plugins import get_registry
    from splice.kinds.prefix_lm import LlavaProjector

    registry = get_registry()
    real = registry.get("projection", "llava")
    liar = type(real)(**{**real.__dict__, "name": "llava",
                         "builder": lambda config: (lambda i, o: LlavaProjector(i, o + 1))})
    monkeypatch.setitem(registry._entries["projection"], "llava", liar)
    problems = _problems(_spec(projector="llava"))
    assert "projector" in problems and "built for widths 16 -> 32" in problems["projector"], problems


def test_freeze_names():
    model = splice.compose(_spec(freeze=["vision", "language"]), seed=0)
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"projector"}
    assert set(model.freeze_groups()) == {"vision", "language", "projector"}
    with pytest.raises(SpliceError, match="freeze"):
        model.freeze(["encoder"])


class _Source:
    """Question/answer batches as the kind expects them: the prompt (BOS, image tokens, a question), the answer
    and EOS; labels -100 but for the answer and EOS."""

    def __init__(self, n_image: int, rows: int = 8):
        g = torch.Generator().manual_seed(0)
        self.px = torch.randn(rows, 3, 32, 32, generator=g)
        answers = torch.randint(3, 90, (rows, 2), generator=g)
        prompt = torch.tensor([BOS] + [IMAGE] * n_image + [40, 41])
        self.ids = torch.cat([prompt.expand(rows, -1), answers, torch.full((rows, 1), EOS)], dim=1)
        self.labels = self.ids.clone()
        self.labels[:, : prompt.numel()] = -100

    def get(self, positions) -> dict:
        idx = torch.tensor([p % len(self.ids) for p in positions])
        return {"pixel_values": self.px[idx], "input_ids": self.ids[idx], "attention_mask": torch.ones_like(
            self.ids[idx]), "labels": self.labels[idx], "captions": [""] * len(idx), "categories": None,
            "errors": []}

    def eval_batches(self, n, batch_size):
        yield self.get(range(len(self.ids)))


def _loss(model, source) -> float:
    batch = source.get(range(len(source.ids)))
    with torch.no_grad():
        return model(batch["input_ids"], batch["pixel_values"], batch["attention_mask"], batch["labels"]).loss.item()


def test_training_lowers_the_loss(tmp_path):
    from splice.train import TrainConfig, train

    model = splice.compose(_spec(), seed=0)
    source = _Source(model.image_seq_length)
    before = _loss(model, source)
    result = train(model, source, TrainConfig(out=str(tmp_path / "run"), max_steps=10, batch_size=8, lr=1e-2,
                                              warmup_steps=0, precision="fp32", progress=False, save_final=False,
                                              threads=1), eval_data=source)
    after = _loss(result.model, source)
    assert after < before - 0.5, (before, after)
    assert result.eval["loss"] == pytest.approx(after, rel=1e-4)


def test_gpt2_language_model_composes_trains_and_generates(tmp_path):
    from splice.train import TrainConfig, train

    spec = _spec(language={"name": "gpt2", "config": dict(GPT2_TINY, tie_word_embeddings=False)},
                 projector="llava", freeze=["vision"])
    model = splice.compose(spec, seed=0)
    source = _Source(model.image_seq_length)
    before = _loss(model, source)
    train(model, source, TrainConfig(out=str(tmp_path / "run"), max_steps=1, batch_size=8, lr=1e-3, warmup_steps=0,
                                     precision="fp32", progress=False, save_final=False, eval_at_end=False,
                                     threads=1))
    assert _loss(model, source) != before
    ids, mask = _prompts(model.image_seq_length)
    out = model.generate(input_ids=ids, attention_mask=mask, pixel_values=_pixels(2), max_new_tokens=4, num_beams=2)
    assert out.shape == (2, ids.shape[1] + 4) and torch.equal(out[:, : ids.shape[1]], ids)
    with pytest.raises(SpliceError, match="language"):
        splice.export_transformers(model, tmp_path / "export")


def test_training_batch_and_generate_need_the_prompt():
    model = splice.compose(_spec(), seed=0)
    source = _Source(model.image_seq_length)
    batch = source.get(range(2))
    assert model.training_weight(batch) == 2 * 3  # two answer tokens and EOS per row, after the shift
    expected = model(batch["input_ids"], batch["pixel_values"], labels=batch["labels"]).loss * 6
    assert torch.allclose(model.training_loss_sum(model, batch), expected)
    with pytest.raises(InputError, match=r"batch\['input_ids'\]"):
        model.training_loss_sum(model, {**batch, "input_ids": None})
    with pytest.raises(InputError, match="labels"):
        model(batch["input_ids"], batch["pixel_values"], labels=batch["labels"][:, 1:])
    with pytest.raises(InputError, match="input_ids"):
        model.generate(pixel_values=batch["pixel_values"])


def test_warm_start_from_a_clip_tower_and_a_llama(tmp_path):
    """LLaVA's recipe: a pretrained CLIP vision tower and a pretrained LM, a new projector between them."""
    clip = perturb(transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**CLIP_TINY)), seed=2)
    llama = perturb(transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA_TINY)), seed=3)
    clip.save_pretrained(tmp_path / "clip")
    llama.save_pretrained(tmp_path / "llama")
    model = splice.compose(_spec(vision={"name": "clip_vision", "pretrained": str(tmp_path / "clip")},
                                 language={"name": "llama", "pretrained": str(tmp_path / "llama")},
                                 freeze=["vision", "language"]), strict=True)
    assert torch.equal(model.vision.embeddings.class_embedding, clip.embeddings.class_embedding)
    assert torch.equal(model.language.lm_head.weight, llama.lm_head.weight)
    assert {n.split(".")[0] for n in model.loading_report.initialised} == {"projector"}


@pytest.mark.parametrize("kind", ["llava", "vipllava"])
def test_tied_text_config(tmp_path, kind):
    """LLaVA takes the text config's tie_word_embeddings; VipLlava reads the top level only (transformers 5.24:
    a VipLlava over a tied LLaMA config keeps an untied head), and splice follows each."""
    cls, config_cls = {"llava": (transformers.LlavaForConditionalGeneration, transformers.LlavaConfig),
                       "vipllava": (transformers.VipLlavaForConditionalGeneration, transformers.VipLlavaConfig)}[kind]
    text = transformers.LlamaConfig(**LLAMA_TINY, tie_word_embeddings=True).to_dict()
    config = config_cls(vision_config=transformers.CLIPVisionConfig(**CLIP_TINY).to_dict(), text_config=text,
                        image_token_index=IMAGE)
    hf = perturb(cls(config), seed=4)
    hf.save_pretrained(tmp_path / "hf")
    model = splice.load(tmp_path / "hf")
    assert (model.language.lm_head is None) == (kind == "llava")
    ids, _ = _prompts(16, lengths=(4, 4))
    with torch.no_grad():
        assert (model(ids, _pixels(2)).logits - hf(input_ids=ids, pixel_values=_pixels(2)).logits).abs().max() < 1e-4
    splice.export_transformers(model, tmp_path / "out")
    again = cls.from_pretrained(tmp_path / "out")
    assert again.config.tie_word_embeddings == (kind == "llava")
