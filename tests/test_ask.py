"""``splice ask`` (issue 16, item 5): the prompt from the chat template or VipLlava's, the image token expanded, the
visual prompts drawn, the answer printed; on a tiny prefix-LM saved and loaded back."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import splice
from splice.ask import VIPLLAVA_TEMPLATE, draw_prompts, parse_box, prompt_ids
from splice.cli import main
from splice.core.errors import InputError
from splice.core.processing import processor_for

from test_prefix_lm import IMAGE, TEMPLATE, _spec, _tokenizer


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    model = splice.compose(_spec(), seed=0)
    model.tokenizer = _tokenizer()
    model.tokenizer.add_special_tokens(["<image>"])  # as LLaVA's tokenizers hold it: one token, never split
    root = tmp_path_factory.mktemp("ask")
    model.save_pretrained(root / "model")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(root / "img.png")
    return root


def _answer(model, image, ids) -> str:
    px = processor_for(model).one(image)[None]
    with torch.no_grad():
        out = model.generate(input_ids=ids, pixel_values=px, attention_mask=torch.ones_like(ids), max_new_tokens=5)
    return " ".join(model.tokenizer.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True).split())


def test_vipllava_template_and_the_expanded_image_token(saved, capsys):
    model = splice.load(saved / "model")
    ids = prompt_ids(model, "w5 w6")
    expected = model.tokenizer.encode(VIPLLAVA_TEMPLATE.format(prompt="w5 w6")).ids
    i = expected.index(IMAGE)
    assert ids[0].tolist() == expected[:i] + [IMAGE] * model.image_seq_length + expected[i + 1:]
    assert main(["ask", str(saved / "model"), str(saved / "img.png"), "w5 w6", "--max-new-tokens", "5"]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == _answer(model, Image.open(saved / "img.png"), ids) and printed


def test_chat_template_renders_the_prompt(saved):
    model = splice.load(saved / "model")
    model.chat_template = TEMPLATE  # no image in its output: the image goes first, as transformers' processor
    ids = prompt_ids(model, "w7")[0].tolist()
    assert ids[: model.image_seq_length] == [IMAGE] * model.image_seq_length
    assert ids[model.image_seq_length:] == model.tokenizer.encode(
        "\n" + TEMPLATE.replace("{% for m in messages %}###{{ m['role'] }}: {{ m['content'] }}{% endfor %}",
                                "###user: " + str([{"type": "image"}, {"type": "text", "text": "w7"}])),
        add_special_tokens=False).ids
    model.chat_template = "{{ messages[0]['content'][1]['text'] }} {{ undefined_call() }}"
    with pytest.raises(InputError, match="chat_template"):
        prompt_ids(model, "w7")


def test_box_and_arrow_are_drawn_before_the_model_sees_the_image(saved, capsys):
    model = splice.load(saved / "model")
    image = Image.open(saved / "img.png")
    boxed = np.asarray(draw_prompts(image, box=(5, 6, 30, 40)))
    assert tuple(boxed[6, 15]) == (255, 0, 0) and tuple(boxed[20, 5]) == (255, 0, 0)  # the outline
    assert np.array_equal(boxed[20, 15], np.asarray(image.convert("RGB"))[20, 15])  # inside untouched
    arrowed = np.asarray(draw_prompts(image, arrow=(2, 2, 35, 40)))
    assert tuple(arrowed[40, 35]) == (255, 0, 0) or tuple(arrowed[39, 34]) == (255, 0, 0)  # the head
    for flag, value, drawn in (("--box", "5,6,30,40", draw_prompts(image, box=(5, 6, 30, 40))),
                               ("--arrow", "2,2,35,40", draw_prompts(image, arrow=(2, 2, 35, 40)))):
        assert main(["ask", str(saved / "model"), str(saved / "img.png"), "w5", flag, value,
                     "--max-new-tokens", "5"]) == 0
        assert capsys.readouterr().out.strip() == _answer(model, drawn, prompt_ids(model, "w5"))


def test_a_tokenizer_that_splits_the_placeholder(saved):
    model = splice.load(saved / "model")
    model.tokenizer = _tokenizer()  # "<image>" is three pieces to its pre-tokenizer
    ids = prompt_ids(model, "w5")[0].tolist()
    n = model.image_seq_length
    assert ids.count(IMAGE) == n and ids[ids.index(IMAGE): ids.index(IMAGE) + n] == [IMAGE] * n
    tail = model.tokenizer.encode("\nw5###Assistant:", add_special_tokens=False).ids
    assert ids[ids.index(IMAGE) + n:] == tail


@pytest.mark.parametrize("value", ["1,2,3", "a,b,c,d", "1,2,3,nan", ""])
def test_bad_boxes_are_named(value):
    with pytest.raises(InputError, match="--box: given .*expected four numbers"):
        parse_box("--box", value)


def test_ask_refuses_what_cannot_answer(saved, tmp_path, capsys):
    captioner = splice.compose({"encoder": {"name": "vit", "config": {"img_size": 32, "patch_size": 8,
                                                                      "embed_dim": 32, "depth": 1, "num_heads": 2}},
                                "decoder": {"name": "gpt2", "config": {"vocab_size": 23, "n_positions": 8,
                                                                       "n_embd": 32, "n_layer": 1, "n_head": 2}}})
    captioner.save_pretrained(tmp_path / "captioner")
    assert main(["ask", str(tmp_path / "captioner"), str(saved / "img.png"), "w5"]) != 0
    assert "does not answer questions" in capsys.readouterr().err
    assert main(["ask", str(saved / "model"), str(saved / "img.png"), "w5 <image>"]) != 0
    assert "image tokens" in capsys.readouterr().err
    assert main(["ask", str(saved / "model"), str(saved / "img.png"), "w5", "--num-beams", "0"]) != 0
    assert "--num-beams" in capsys.readouterr().err


def test_splice_train_on_question_answer_rows_in_two_stages(saved, tmp_path, capsys):
    """JSONL questions: the prompt as `splice ask` builds it, the loss on the answer (+ eos) alone; stage 1 trains
    the projector only, stage 2 the projector and the language model."""
    from splice.ask import load_prompt_qa_data

    rows = [{"image": str(saved / "img.png"), "question": f"w{5 + i % 3}", "answer": f"w{10 + i % 3}"}
            for i in range(8)]
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(__import__("json").dumps(r) + "\n" for r in rows))
    model = splice.load(saved / "model")
    train_src, _, _ = load_prompt_qa_data(data, model)
    batch = train_src.get(range(2))
    prompt = prompt_ids(model, batch["captions"][0])[0].tolist()
    n = len(prompt)
    assert batch["input_ids"][0, :n].tolist() == prompt
    answer = int(batch["captions"][0][1:]) + 5  # w5 -> w10 ...
    assert batch["labels"][0, :n].eq(-100).all() and batch["labels"][0, n].item() == answer
    assert batch["labels"][0, n + 1].item() == model.tokens["eos"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert main(["train", str(saved / "model"), "--data", str(data), "--out", str(tmp_path / "s1"), "--freeze",
                 "vision", "language", "--max-steps", "2", "--batch-size", "4", "--threads", "1",
                 "--no-progress"]) == 0
    stage1 = splice.load(tmp_path / "s1" / "model").state_dict()
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], stage1[k])}
    assert changed == {"projector"}
    assert main(["train", str(tmp_path / "s1" / "model"), "--data", str(data), "--out", str(tmp_path / "s2"),
                 "--freeze", "vision", "--max-steps", "2", "--batch-size", "4", "--threads", "1",
                 "--no-progress"]) == 0
    stage2 = splice.load(tmp_path / "s2" / "model").state_dict()
    assert {k.split(".")[0] for k in stage1 if not torch.equal(stage1[k], stage2[k])} == {"projector", "language"}
    assert main(["train", str(saved / "model"), "--data", str(data), "--out", str(tmp_path / "s3"), "--freeze",
                 "encoder", "--max-steps", "1", "--no-progress"]) != 0
    assert "freeze" in capsys.readouterr().err


def test_a_short_prefix_lm_demo_run(tmp_path, capsys):
    from splice import demo_prefix_lm, synthetic

    model = splice.compose(demo_prefix_lm.SPEC, seed=0)
    model.tokenizer = demo_prefix_lm.build_tokenizer()
    data = demo_prefix_lm.ShapesPromptQA(model)
    batch = data.get(range(4))
    for i in range(4):  # the labels are the answer and eos, after the prompt built as `splice ask` builds it
        prompt = list(data.prompt(batch["captions"][i]))
        assert batch["input_ids"][i, : len(prompt)].tolist() == prompt
        target = [t for t in batch["labels"][i].tolist() if t != -100]
        assert model.tokenizer.decode(target[:-1]) == batch["answers"][i] and target[-1] == model.tokens["eos"]
    boxed = next(k for k in range(40) if data.sample(synthetic.HELDOUT_STREAM, k)[3] == "box")
    image, q, answer, _ = data.sample(synthetic.HELDOUT_STREAM, boxed)
    assert q == "what is in the red box" and (image == [255, 0, 0]).all(axis=-1).any()  # the box is drawn
    assert demo_prefix_lm.run(out=str(tmp_path / "d"), minutes=0.05, eval_size=20, progress=False) == 0
    text = capsys.readouterr().out
    assert "held-out exact match:" in text and "box" in text and "where" in text and "loaded it back" in text
    assert splice.load(tmp_path / "d" / "model").chat_template == demo_prefix_lm.TEMPLATE

