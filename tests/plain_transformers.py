"""What a user of a download types: plain ``from_pretrained(folder)`` on the CPU, then ``generate``."""

from __future__ import annotations

from transformers import AutoProcessor, LlavaForConditionalGeneration

from qvlm.data.easy_vqa import evaluation_subset
from qvlm.models.inference import prepare_inputs


def plain_load(folder):
    """``from_pretrained(folder)`` with no extra argument and no warm-up call: model (eval mode) and processor."""
    return LlavaForConditionalGeneration.from_pretrained(folder).eval(), AutoProcessor.from_pretrained(folder)


def plain_answers(folder, grad_mode, n: int = 2) -> list[str]:
    """Greedy answers of ``n`` easy-VQA test questions from a plainly loaded folder, under ``grad_mode``
    (``torch.no_grad`` or ``torch.inference_mode``, the two a user writes)."""
    model, processor = plain_load(folder)
    samples = evaluation_subset(n, seed=1)
    inputs = prepare_inputs(processor, [s.load_image() for s in samples], [s.question for s in samples])
    with grad_mode():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    return processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
