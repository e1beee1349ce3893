"""Train the bundled tiny LLaVA on easy-VQA from random weights, on a CPU, in LLaVA's stages.

Why stages: trained jointly from scratch, the model settles on the language prior (~67% test
accuracy: yes/no balance) and the vision tower learns nothing. So:

1. **vision**: the vision tower alone learns each image's shape and colour (labels implied by
   the training questions, :func:`qvlm.data.image_labels`), with flips, 90-degree turns and
   shifts as augmentation (all answer-preserving for easy-VQA).
2. **captions**: the language model learns the question mix with each image shown to it as a
   *caption in its own word space*: every image token is ``E[colour] + E[shape]`` (its input
   embeddings of the image's two label words). Why: "is there a <colour> shape?" needs the LLM
   to compare a question word with the image, and a from-scratch LLM learns that comparison
   in a few hundred steps when both sides live in the same embedding space, but stayed at
   chance for 1,000+ steps against projected vision features (measured; see the model card).
3. **projector**: LLaVA's feature-alignment stage: the projector alone (vision tower and LLM
   frozen) learns to map patch features onto those caption tokens, by the answer loss plus a
   relative squared error to ``E[colour] + E[shape]``.
4. **joint**: everything on the answer tokens, with the stage-1 heads kept as an auxiliary loss
   so the vision tower does not forget.

Stages 2-4 use each image's own questions plus questions written from the dataset's templates
with balanced comparisons (:mod:`training.questions`).

Why it is affordable on 2 cores: each image is encoded once per step for *all* of its
questions, and the loss only needs the answer positions.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from qvlm.data import COLORS, SHAPES, chat_messages, image_labels, load_image, load_split
from training.questions import QuestionSynth, mentions_color
from training.tiny_llava import TinyLlavaSpec, build_model, build_processor, build_tokenizer


@dataclass
class TrainConfig:
    """Every knob of the training run; saved next to the weights as ``training_config.json``."""

    spec: TinyLlavaSpec = field(default_factory=TinyLlavaSpec)
    seed: int = 0
    vision_epochs: int = 150  # 16x16 patches need long training to tell small shapes apart (30: 67% shape)
    vision_batch: int = 64
    vision_lr: float = 2e-3
    caption_steps: int = 2500  # stage 2: the LLM on label captions (no vision forward: cheap)
    caption_lr: float = 1e-3
    align_steps: int = 300  # stage 3: the projector alone, LLM and vision frozen
    align_lr: float = 2e-3
    align_weight: float = 1.0  # relative squared error of projected tokens to the caption tokens
    joint_epochs: int = 2
    images_per_step: int = 6  # each image brings all of its ~10 questions
    joint_lr: float = 5e-4  # lower than stage 2's: the LLM already answers; this adapts it
    joint_vision_lr: float = 2e-4
    joint_align_weight: float = 0.1  # keeps the image tokens near the caption space while all adapt
    aux_weight: float = 0.5
    original_per_image: int = 6  # of an image's ~10 own questions, this many per step
    synth_per_image: int = 6  # plus this many from the templates, comparisons balanced (questions.py)
    weight_decay: float = 0.05
    warmup_fraction: float = 0.05
    max_steps: int | None = None  # per stage; for smoke tests
    train_images: int | None = None  # use only the first N training images; for smoke tests
    eval_questions: int = 1000
    threads: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


class AttributeHeads(nn.Module):
    """Linear shape/colour classifiers applied to *every* patch feature the LLM sees.

    Per token rather than on the mean: it makes each image token carry the image's shape and
    colour, so the LLM can read them with one attention hop to any image token instead of
    having to find the few patches the shape covers. (With a mean-pooled head, the vision
    tower reached 99% but the LLM plateaued near 92% on yes/no comparisons.)
    """

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.shape = nn.Linear(hidden, len(SHAPES))
        self.color = nn.Linear(hidden, len(COLORS))

    def forward(self, patch_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.shape(patch_features), self.color(patch_features)

    def loss(self, patch_features: torch.Tensor, shape_y: torch.Tensor, color_y: torch.Tensor) -> torch.Tensor:
        shape_logits, color_logits = self(patch_features)
        tokens = patch_features.shape[1]
        return F.cross_entropy(
            shape_logits.flatten(0, 1), shape_y.repeat_interleave(tokens), ignore_index=-1
        ) + F.cross_entropy(color_logits.flatten(0, 1), color_y.repeat_interleave(tokens), ignore_index=-1)

    def predict(self, patch_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape_logits, color_logits = self(patch_features)
        return shape_logits.mean(dim=1).argmax(-1), color_logits.mean(dim=1).argmax(-1)


def _pixel_table(processor, split: str, ids: list[int]) -> torch.Tensor:
    images = [load_image(split, i) for i in ids]
    out = []
    for start in range(0, len(images), 256):
        out.append(processor.image_processor(images[start : start + 256], return_tensors="pt")["pixel_values"])
    return torch.cat(out)


def augment(pixels: torch.Tensor, generator: torch.Generator, max_shift: int = 8) -> torch.Tensor:
    """Random flips, 90-degree turns and shifts; the background (a corner pixel) fills the gap.

    Every easy-VQA answer is invariant to these, since an image holds one shape on a plain background.
    """
    out = torch.empty_like(pixels)
    n, _, h, w = pixels.shape
    draws = torch.randint(0, 1 << 30, (n, 5), generator=generator, device=generator.device).tolist()
    for i, (flip, turns, dy, dx, _) in enumerate(draws):
        img = pixels[i]
        if flip % 2:
            img = img.flip(-1)
        img = torch.rot90(img, k=turns % 4, dims=(1, 2))
        dy, dx = dy % (2 * max_shift + 1) - max_shift, dx % (2 * max_shift + 1) - max_shift
        background = img[:, :1, :1].expand(-1, h, w).clone()
        ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
        xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
        background[:, yd, xd] = img[:, ys, xs]
        out[i] = background
    return out


def _capped(steps: int, max_steps: int | None) -> int:
    """A stage's step count, capped by ``TrainConfig.max_steps`` (smoke runs)."""
    return min(steps, max_steps) if max_steps else steps


def lr_lambda(total_steps: int, warmup_fraction: float) -> Callable[[int], float]:
    warmup = max(1, int(total_steps * warmup_fraction))

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return schedule


class QuestionTable:
    """Token ids of every question (with its answer) and where the answer starts."""

    def __init__(self, processor, image_tokens: int) -> None:
        self.tokenizer = processor.tokenizer
        self.processor = processor
        self.image_tokens = image_tokens
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(processor.image_token)
        self._cache: dict[tuple[str, str], tuple[list[int], int]] = {}

    def encode(self, question: str, answer: str) -> tuple[list[int], int]:
        """(ids with the image placeholder expanded, index of the first answer token)."""
        key = (question, answer)
        if key not in self._cache:
            full = self.processor.apply_chat_template(chat_messages(question, answer))
            ids = self.tokenizer(full)["input_ids"]
            answer_ids = self.tokenizer(answer, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
            assert ids[-len(answer_ids) :] == answer_ids, "answer must be the sequence's tail"
            at = ids.index(self.image_token_id)
            ids = ids[:at] + [self.image_token_id] * self.image_tokens + ids[at + 1 :]
            self._cache[key] = (ids, len(ids) - len(answer_ids))
        return self._cache[key]


def vision_patch_features(model, pixels: torch.Tensor) -> torch.Tensor:
    cfg = model.config
    out = model.model.vision_tower(pixels, output_hidden_states=True)
    return out.hidden_states[cfg.vision_feature_layer][:, 1:]


def encode_questions(table: QuestionTable, questions: list[list]) -> tuple[list[list[int]], list[int], list[int]]:
    """(token rows, owning image index, first answer position) of every question of every image."""
    rows, owners, starts = [], [], []
    for img_index, qs in enumerate(questions):
        for q in qs:
            ids, start = table.encode(q.question, q.answer)
            rows.append(ids)
            owners.append(img_index)
            starts.append(start)
    return rows, owners, starts


def answer_token_loss(model, hidden: torch.Tensor, rows: list[list[int]], starts: list[int],
                      offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy on every answer token, and the first answer token's correctness per row.

    ``hidden`` [rows, positions, hidden] holds sequence position ``t`` at index ``t - offset``
    (``offset`` > 0 when a shared prefix ran separately).
    """
    targets, positions = [], []
    for i, (r, s) in enumerate(zip(rows, starts)):
        for t in range(s, len(r)):
            positions.append((i, t - 1 - offset))
            targets.append(r[t])
    idx = torch.tensor(positions)
    logits = model.lm_head(hidden[idx[:, 0], idx[:, 1]])
    targets_t = torch.tensor(targets)
    loss = F.cross_entropy(logits, targets_t)
    first = torch.tensor([positions.index((i, s - 1 - offset)) for i, s in enumerate(starts)])
    return loss, logits[first].argmax(-1) == targets_t[first]


def answer_loss(model, table: QuestionTable, image_embeds: torch.Tensor, questions: list[list], pad_id: int):
    """Cross-entropy on answer tokens of every question of every image.

    ``image_embeds`` [images, tokens, hidden] are what the LLM sees in place of ``<image>``
    (projected patch features, or caption tokens). Returns (loss, per-question first-answer-token
    correctness as a bool tensor, in the order of ``questions`` flattened).
    """
    rows, owners, starts = encode_questions(table, questions)
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    is_image = ids == table.image_token_id
    embeds = model.get_input_embeddings()(ids.masked_fill(is_image, pad_id))
    embeds = embeds.masked_scatter(is_image.unsqueeze(-1), image_embeds[owners].reshape(-1, embeds.shape[-1]))
    hidden = model.model.language_model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    return answer_token_loss(model, hidden, rows, starts)


class _Tally:
    """Running first-answer-token accuracy, overall and on yes/no questions about a colour.

    The colour comparisons are the part a tiny LLM learns last (and the one that failed before
    the caption stage), so the progress bar shows them on their own.
    """

    def __init__(self) -> None:
        self.seen = self.correct = self.color_seen = self.color_correct = 0

    def add(self, questions: list[list], correct: torch.Tensor) -> None:
        flat = [q for qs in questions for q in qs]
        is_color_yn = torch.tensor([q.question_type == "yes/no" and mentions_color(q.question) for q in flat])
        self.seen += len(flat)
        self.correct += int(correct.sum())
        self.color_seen += int(is_color_yn.sum())
        self.color_correct += int((correct & is_color_yn).sum())

    def postfix(self) -> dict[str, str]:
        out = {"acc": f"{self.correct / max(1, self.seen):.3f}",
               "color_yn": f"{self.color_correct / max(1, self.color_seen):.3f}"}
        self.__init__()
        return out


class _CaptionTokens:
    """``E[colour] + E[shape]`` of each image, on every image token: the image as the LLM's own words."""

    def __init__(self, tokenizer, tokens: int) -> None:
        self.tokens = tokens
        self.color_ids = torch.tensor(tokenizer.convert_tokens_to_ids(list(COLORS)))
        self.shape_ids = torch.tensor(tokenizer.convert_tokens_to_ids(list(SHAPES)))

    def __call__(self, model, shape_y: torch.Tensor, color_y: torch.Tensor) -> torch.Tensor:
        emb = model.get_input_embeddings()
        words = emb(self.color_ids[color_y]) + emb(self.shape_ids[shape_y])
        return words[:, None, :].expand(-1, self.tokens, -1)


def relative_sq_error(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """||x - t||^2 / ||t||^2 per token, averaged: scale-free, so one weight fits any embedding size."""
    return ((x - target).pow(2).sum(-1) / target.pow(2).sum(-1).clamp_min(1e-8)).mean()


def _run_steps(desc: str, total: int, params: list, opt, sched, step_fn, after_step=None, log_every: int = 20) -> None:
    """``total`` optimizer steps of ``step_fn(step) -> (loss, questions, correct)`` with a progress bar."""
    tally = _Tally()
    bar = tqdm(total=total, desc=desc, unit="step")
    for step in range(1, total + 1):
        loss, questions, correct = step_fn(step)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        tally.add(questions, correct)
        if after_step is not None:
            after_step(step)
        bar.update()
        if step % log_every == 0 or step == total:
            bar.set_postfix(loss=f"{loss.item():.3f}", **tally.postfix())
    bar.close()


def train_tiny_llava(out_dir: str | Path, config: TrainConfig | None = None, log: Callable[[str], None] = print) -> dict:
    """Train and save the model + processor to ``out_dir``; returns the training report."""
    cfg = config or TrainConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    t_start = time.perf_counter()

    tokenizer = build_tokenizer()
    processor = build_processor(cfg.spec, tokenizer)
    model = build_model(cfg.spec, tokenizer, seed=cfg.seed)
    heads = AttributeHeads(cfg.spec.vision_hidden)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params:,} parameters, {cfg.spec.image_tokens} image tokens")

    labels = image_labels("train")
    image_ids = sorted(labels)[: cfg.train_images] if cfg.train_images else sorted(labels)
    pixels = _pixel_table(processor, "train", image_ids)
    shape_y = torch.tensor([labels[i][0] for i in image_ids])
    color_y = torch.tensor([labels[i][1] for i in image_ids])
    report: dict = {"parameters": n_params, "train_config": cfg.to_dict()}

    # ---- stage 1: vision tower + attribute heads -------------------------------------------
    vision_params = list(model.model.vision_tower.parameters()) + list(heads.parameters())
    steps_per_epoch = math.ceil(len(image_ids) / cfg.vision_batch)
    total = _capped(steps_per_epoch * cfg.vision_epochs, cfg.max_steps)
    opt = torch.optim.AdamW(vision_params, lr=cfg.vision_lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total, cfg.warmup_fraction))
    model.train()
    step = 0
    bar = tqdm(total=total, desc="stage 1: vision", unit="step")
    while step < total:
        order = torch.randperm(len(image_ids), generator=gen)
        for start in range(0, len(order), cfg.vision_batch):
            if step >= total:
                break
            b = order[start : start + cfg.vision_batch]
            loss = heads.loss(vision_patch_features(model, augment(pixels[b], gen)), shape_y[b], color_y[b])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vision_params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    report["vision_attribute_accuracy_test"] = _attribute_accuracy(model, heads, processor)
    log(f"stage 1 test attribute accuracy: {report['vision_attribute_accuracy_test']}")

    # ---- stages 2-4 share the question mix ----------------------------------------------------
    by_image: dict[int, list] = {}
    for s in load_split("train"):
        by_image.setdefault(s.image_id, []).append(s)
    table = QuestionTable(processor, cfg.spec.image_tokens)
    synth = QuestionSynth()
    rng = random.Random(cfg.seed)
    captions = _CaptionTokens(tokenizer, cfg.spec.image_tokens)
    pad = tokenizer.pad_token_id

    def questions_of(image_id: int) -> list:
        own = by_image[image_id]
        own = rng.sample(own, min(len(own), cfg.original_per_image))
        return own + synth.sample(*labels[image_id], cfg.synth_per_image, rng)

    def image_batch(pool: torch.Tensor) -> torch.Tensor:
        return pool[torch.randint(0, len(pool), (cfg.images_per_step,), generator=gen)]

    def optimizer(groups: list[dict], steps: int):
        opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(steps, cfg.warmup_fraction))

    # Images whose shape and colour are both known (a caption needs both).
    labelled = torch.tensor([k for k, i in enumerate(image_ids) if labels[i][0] >= 0 and labels[i][1] >= 0])
    projector = list(model.model.multi_modal_projector.parameters())
    projector_ids = {id(p) for p in projector}
    vision = list(model.model.vision_tower.parameters())
    vision_ids = {id(p) for p in vision}
    language = [p for p in model.parameters() if id(p) not in vision_ids and id(p) not in projector_ids]

    # ---- stage 2: the LLM on label captions -----------------------------------------------------
    total = _capped(cfg.caption_steps, cfg.max_steps)
    if total:
        opt, sched = optimizer([{"params": language, "lr": cfg.caption_lr}], total)

        def caption_step(step: int):
            b = image_batch(labelled)
            qs = [questions_of(image_ids[i]) for i in b.tolist()]
            loss, correct = answer_loss(model, table, captions(model, shape_y[b], color_y[b]), qs, pad)
            return loss, qs, correct

        _run_steps("stage 2: captions", total, language, opt, sched, caption_step)

    # ---- stage 3: the projector onto the caption tokens (LLaVA's feature alignment) ---------------
    total = _capped(cfg.align_steps, cfg.max_steps)
    if total:
        for p in language + vision:
            p.requires_grad_(False)
        opt, sched = optimizer([{"params": projector, "lr": cfg.align_lr}], total)

        def align_step(step: int):
            b = image_batch(labelled)
            qs = [questions_of(image_ids[i]) for i in b.tolist()]
            with torch.no_grad():
                feats = vision_patch_features(model, augment(pixels[b], gen))
                target = captions(model, shape_y[b], color_y[b])
            tokens = model.model.multi_modal_projector(feats)
            loss, correct = answer_loss(model, table, tokens, qs, pad)
            return loss + cfg.align_weight * relative_sq_error(tokens, target), qs, correct

        _run_steps("stage 3: projector", total, projector, opt, sched, align_step)
        for p in language + vision:
            p.requires_grad_(True)
    _save(model, processor, out, cfg, report)

    # ---- stage 4: the whole LLaVA on answer tokens -------------------------------------------
    steps_per_epoch = math.ceil(len(image_ids) / cfg.images_per_step)
    total = _capped(steps_per_epoch * cfg.joint_epochs, cfg.max_steps)
    groups = [
        {"params": language + projector, "lr": cfg.joint_lr},
        {"params": vision + list(heads.parameters()), "lr": cfg.joint_vision_lr},
    ]
    opt, sched = optimizer(groups, total)
    order: list[int] = []

    def joint_step(step: int):
        nonlocal order
        if len(order) < cfg.images_per_step:
            order = torch.randperm(len(image_ids), generator=gen).tolist()
        b, order = torch.tensor(order[: cfg.images_per_step]), order[cfg.images_per_step :]
        qs = [questions_of(image_ids[i]) for i in b.tolist()]
        feats = vision_patch_features(model, augment(pixels[b], gen))
        tokens = model.model.multi_modal_projector(feats)
        loss, correct = answer_loss(model, table, tokens, qs, pad)
        loss = loss + cfg.aux_weight * heads.loss(feats, shape_y[b], color_y[b])
        if cfg.joint_align_weight:
            known = (shape_y[b] >= 0) & (color_y[b] >= 0)
            if known.any():
                with torch.no_grad():
                    target = captions(model, shape_y[b][known], color_y[b][known])
                loss = loss + cfg.joint_align_weight * relative_sq_error(tokens[known], target)
        return loss, qs, correct

    def save_each_epoch(step: int) -> None:
        if step % steps_per_epoch == 0 or step == total:
            _save(model, processor, out, cfg, report)

    _run_steps("stage 4: joint", total, [p for g in groups for p in g["params"]], opt, sched, joint_step,
               after_step=save_each_epoch)
    model.eval()
    report["train_seconds"] = round(time.perf_counter() - t_start, 1)
    report["quick_test_accuracy"] = _quick_answer_accuracy(model, processor, table, cfg.eval_questions)
    log(f"trained in {report['train_seconds']} s; answer accuracy on {cfg.eval_questions} test questions: "
        f"{report['quick_test_accuracy']:.4f}")
    _save(model, processor, out, cfg, report)
    return report


def _save(model, processor, out: Path, cfg: TrainConfig, report: dict) -> None:
    model.to(torch.float16).save_pretrained(out)
    model.to(torch.float32)
    processor.save_pretrained(out)
    report = {"task": "easy-vqa", **report}  # what qvlm calibrates and scores it on (qvlm.data.tasks.recorded_task)
    (out / "training_report.json").write_text(json.dumps(report, indent=2, default=str))


@torch.no_grad()
def _attribute_accuracy(model, heads: AttributeHeads, processor) -> dict[str, float]:
    model.eval()
    labels = {i: v for i, v in image_labels("test").items()}
    ids = sorted(labels)
    pixels = _pixel_table(processor, "test", ids)
    shape_pred, color_pred = heads.predict(vision_patch_features(model, pixels))
    shape_y = torch.tensor([labels[i][0] for i in ids])
    color_y = torch.tensor([labels[i][1] for i in ids])
    model.train()
    ks, kc = shape_y >= 0, color_y >= 0
    return {
        "shape": round((shape_pred[ks] == shape_y[ks]).float().mean().item(), 4),
        "color": round((color_pred[kc] == color_y[kc]).float().mean().item(), 4),
    }


@torch.no_grad()
def _quick_answer_accuracy(model, processor, table: QuestionTable, n: int) -> float:
    """Teacher-forced first-answer-token accuracy on a fixed test subset (the CLI eval uses generate)."""
    from qvlm.data import evaluation_subset

    samples = evaluation_subset(n, seed=1)
    correct = 0
    for start in range(0, len(samples), 64):
        chunk = samples[start : start + 64]
        pixels = _pixel_table(processor, "test", [s.image_id for s in chunk])
        tokens = model.model.multi_modal_projector(vision_patch_features(model, pixels))
        _, ok = answer_loss(model, table, tokens, [[s] for s in chunk], processor.tokenizer.pad_token_id)
        correct += int(ok.sum())
    return correct / len(samples)
