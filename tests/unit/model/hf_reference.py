"""What transformers alone computes from exported llava-hf folders; run as a script, never imports vitune.

    python hf_reference.py SPEC.json OUT.pt

SPEC: {"parity": [{"name", "folder", "image", "messages"}], "pixels": [{"folder", "images"}],
"templates": [{"folder", "cases": [{"messages", "add_generation_prompt"}]}]}. OUT (torch.save): per parity
case the loading report, rendered prompt, input ids, logits, 16 greedy tokens and pixel values (PIL and
default image backends); per pixel case the PIL-backend pixels; per template case the rendered text and
its token ids, or the error the template raised.
"""

from __future__ import annotations

import json
import sys

sys.modules["vitune"] = None  # type: ignore[assignment]  # any `import vitune` now fails: transformers alone

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import AutoProcessor, LlavaForConditionalGeneration  # noqa: E402

GREEDY_TOKENS = 16


def _with_image(messages: list[dict], image: Image.Image) -> list[dict]:
    out = []
    for message in messages:
        content = message["content"]
        if isinstance(content, list):
            content = [{**part, "image": image} if part["type"] == "image" else part for part in content]
        out.append({**message, "content": content})
    return out


def parity(case: dict) -> dict:
    model, info = LlavaForConditionalGeneration.from_pretrained(case["folder"], output_loading_info=True)
    model.eval()
    processor = AutoProcessor.from_pretrained(case["folder"], backend="pil")  # vitune resizes with PIL
    default_processor = AutoProcessor.from_pretrained(case["folder"])
    image = Image.open(case["image"]).convert("RGB")
    messages = _with_image(case["messages"], image)
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
        model.generation_config.eos_token_id = None  # no stop token: all 16 steps, whatever the random model emits
        generated = model.generate(**inputs, max_new_tokens=GREEDY_TOKENS, do_sample=False)
    return {
        "loading": {k: sorted(map(str, v)) for k, v in info.items()},
        "text": text,
        "input_ids": inputs["input_ids"][0].tolist(),
        "logits": logits[0],
        "tokens": generated[0, inputs["input_ids"].shape[1]:].tolist(),
        "pixels_pil": processor.image_processor(images=image, return_tensors="pt")["pixel_values"][0],
        "pixels_default": default_processor.image_processor(images=image, return_tensors="pt")["pixel_values"][0],
    }


def pixels(case: dict) -> list[torch.Tensor]:
    processor = AutoProcessor.from_pretrained(case["folder"], backend="pil")
    return [processor.image_processor(images=Image.open(p).convert("RGB"), return_tensors="pt")["pixel_values"][0]
            for p in case["images"]]


def render(processor, case: dict) -> dict:
    try:
        text = processor.apply_chat_template(case["messages"], add_generation_prompt=case["add_generation_prompt"])
    except Exception as exc:  # noqa: BLE001 - the test compares refusals too
        return {"error": f"{type(exc).__name__}: {exc}"}
    return {"text": text, "ids": processor.tokenizer(text, add_special_tokens=False)["input_ids"]}


def main(spec_path: str, out_path: str) -> None:
    spec = json.loads(open(spec_path).read())
    out = {
        "parity": {case["name"]: parity(case) for case in spec.get("parity", [])},
        "pixels": [pixels(case) for case in spec.get("pixels", [])],
        "templates": [],
    }
    for group in spec.get("templates", []):
        processor = AutoProcessor.from_pretrained(group["folder"], backend="pil")
        out["templates"].append([render(processor, case) for case in group["cases"]])
    out["vitune_modules"] = sorted(m for m in sys.modules if m.startswith("vitune") and sys.modules[m] is not None)
    torch.save(out, out_path)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
