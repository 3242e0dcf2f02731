"""Paper-scale GPU check of micl: Llama-3.2-1B shapes + LoRA + a CLIP ViT-L/14 projector, bf16, on one GPU.

Everything is built here from configs with random weights (LLM, CLIP vision tower, a word-level tokenizer
with a Llama-3-style chat template), so the check needs no network and no downloads. Stages, each timed on
its own, written to the JSON as soon as it ends (a killed or timed-out run keeps the stages finished so far),
a failing stage recorded with its error while the next one still runs:

  matmul        the GPU's bf16 matmul rate: best of several 8192^2 matmuls
  train         micl's training step (MiclTrainer.training_step: MultimodalLM forward with media features
                [B, 256, 1024] + loss + backward; gradient clipping and the Trainer's AdamW; the model
                prepared for bf16 mixed precision by accelerate as Trainer.train does) at batch 8 and 32:
                tokens/s and MFU (4N FLOPs/token) against `matmul`. N = weights of every nn.Linear of the LLM (LoRA and
                lm_head included, embeddings and projectors not); 4N = forward 2N + backward to the
                activations 2N (the frozen base gets no weight gradients; full fine-tuning would be 6N)
  step_vs_peft  the micl step / a plain PEFT LoRA step (the same LLM, plain input_ids of the same length,
                no projectors, a plain transformers.Trainer step), interleaved, at batch 8
  methods       MoInCL step (the main batch through the student; 2 pseudo-target rows and 4 text-only
                instructions through the teacher adapter and the student: micl.methods.moincl.MoInCL with a
                micl.methods.teacher.PreviousModelTeacher) / the fine-tuning step, the same batch of 8
  clip          CLIP ViT-L/14 vision tower images/s (bf16, batch 256, random pixels 224x224)
  generation    paper decoding (beam 5, max_new_tokens 80, repetition_penalty 1.15) through
                MultimodalLM.generate at batch 8 and 64; greedy batched (64 prompts) vs one by one (the
                same 64): speedup. Last, as the longest: a deadline cuts it short rather than a cheap stage
Each stage also records its peak GPU memory (torch.cuda.max_memory_allocated, reset between stages).
A paper sample is 322 tokens: chat template 26 + 256 media placeholders + instruction 21 + target 18 + end token.

On the GPU machine (from the repository root; no install needed, the script puts the checkout on sys.path):

    python scripts/bench_gpu.py --out $OUT/bench_results_gpu.json

    python scripts/bench_gpu.py --tiny --out /tmp/bench_gpu_tiny.json   # tiny shapes, CPU, seconds (tests)
    python scripts/bench_gpu.py --stages matmul,train --deadline 300
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

STAGES = ("matmul", "train", "step_vs_peft", "methods", "clip", "generation")
MIN_STAGE_SECONDS = 5.0  # a stage that would get less is skipped, not started

# a paper sample's text (word-level tokens: ~19 instruction, ~18 target with the end token)
INSTRUCTION = "What is the person in the image doing, and what color is the large object on the left side?"
TARGET = "The person is riding a red bicycle along a quiet street next to an old stone bridge."
PSEUDO_INSTRUCTION = "Describe the image in one short sentence."
PSEUDO_TARGET = "A person rides a red bicycle on a quiet street beside an old stone bridge at noon."


@dataclass(frozen=True)
class Scale:
    name: str
    llm: dict
    vision: dict
    lora: dict = field(default_factory=lambda: {"r": 8, "alpha": 32, "dropout": 0.1,
                                                "target_modules": ["q_proj", "v_proj"]})
    media_tokens: int = 256
    matmul_size: int = 8192
    matmul_repeats: int = 10
    train_batches: tuple = (8, 32)
    ratio_batch: int = 8
    warmup_steps: int = 2
    timed_steps: int = 8
    beams: int = 5
    max_new_tokens: int = 80
    repetition_penalty: float = 1.15
    beam_batches: tuple = (8, 64)
    greedy_prompts: int = 64
    clip_batch: int = 256
    clip_batches: int = 5


PAPER = Scale(
    name="paper",
    # Llama-3.2-1B(-Instruct)
    llm=dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
             num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
             rope_theta=500000.0, max_position_embeddings=131072, rms_norm_eps=1e-5, hidden_act="silu",
             rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    # openai/clip-vit-large-patch14 vision tower: 16 x 16 patches + CLS
    vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                patch_size=14, image_size=224, hidden_act="quick_gelu"),
)

TINY = Scale(
    name="tiny",
    llm=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, vocab_size=512, tie_word_embeddings=True, rope_theta=500000.0,
             max_position_embeddings=2048),
    vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=14,
                image_size=56),
    media_tokens=16, matmul_size=256, matmul_repeats=3, train_batches=(2, 4), ratio_batch=2, warmup_steps=1,
    timed_steps=2, beams=2, max_new_tokens=4, beam_batches=(2, 4), greedy_prompts=4, clip_batch=4, clip_batches=2,
)

#: what one H200 is expected to reach (the issue's targets; printed beside the measurements, never tuned)
TARGETS = [
    # (label, stage, key path in the stage result, comparison, threshold)
    ("MFU (4N FLOPs/token), batch 32", "train", ("batch_32", "mfu_4n"), ">=", 0.45),
    ("micl step / PEFT LoRA step", "step_vs_peft", ("ratio",), "<=", 1.08),
    ("greedy batched / one-by-one generation", "generation", ("greedy", "speedup"), ">=", 8.0),
    ("CLIP-L encoding images/s", "clip", ("images_per_s",), ">=", 2000.0),
]


# ---- helpers ------------------------------------------------------------------------------------------
class StageTimeout(Exception):
    pass


def _on_alarm(signum, frame):
    raise StageTimeout("stage time limit reached")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def gib(n_bytes: int) -> float:
    return round(n_bytes / 2**30, 3)


class PeakMemory:
    """torch.cuda.max_memory_allocated within a stage, with resets between its parts (None on CPU)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stage_peak = 0

    def start_stage(self) -> None:
        self.stage_peak = 0
        self.reset()

    def reset(self) -> None:
        if self.device.type == "cuda":
            self.stage_peak = max(self.stage_peak, torch.cuda.max_memory_allocated(self.device))
            torch.cuda.reset_peak_memory_stats(self.device)

    def part(self) -> float | None:
        return gib(torch.cuda.max_memory_allocated(self.device)) if self.device.type == "cuda" else None

    def stage(self) -> float | None:
        if self.device.type != "cuda":
            return None
        return gib(max(self.stage_peak, torch.cuda.max_memory_allocated(self.device)))


# ---- model, tokenizer, batches ------------------------------------------------------------------------
SPECIAL = {"bos": "<|begin_of_text|>", "eos": "<|eot_id|>", "pad": "<|finetune_right_pad_id|>", "unk": "<unk>",
           "start": "<|start_header_id|>", "end": "<|end_header_id|>", "eot": "<|end_of_text|>"}
# Llama-3.2 Instruct's layout, with its default system header when no system message is given
CHAT_TEMPLATE = (
    "{{ '<|begin_of_text|>' }}"
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
    "Today Date: 26 Jul 2024\n\n<|eot_id|>' }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def build_tokenizer(vocab_size: int):
    """A word-level tokenizer of exactly `vocab_size` entries: the special tokens, the words of micl's prompt
    files and of the samples here, then filler words; a Llama-3-style chat template."""
    import re

    from tokenizers import AddedToken, Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    words: list[str] = list(dict.fromkeys(SPECIAL.values()))
    texts = [INSTRUCTION, TARGET, PSEUDO_INSTRUCTION, PSEUDO_TARGET, CHAT_TEMPLATE,
             "system user assistant image: video: audio:"]
    texts += [(REPO / "prompts" / name).read_text() for name in ("templates.yaml", "instructions.jsonl")
              if (REPO / "prompts" / name).is_file()]
    for text in texts:
        for word in re.findall(r"\w+|[^\w\s]+", text.lower()):
            if word not in words and len(words) < vocab_size:
                words.append(word)
    words += [f"w{i}" for i in range(vocab_size - len(words))]
    vocab = {word: i for i, word in enumerate(dict.fromkeys(words[:vocab_size]))}
    assert len(vocab) == vocab_size, (len(vocab), vocab_size)
    backend = Tokenizer(WordLevel(vocab, unk_token=SPECIAL["unk"]))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=SPECIAL["bos"], eos_token=SPECIAL["eos"],
                                        pad_token=SPECIAL["pad"], unk_token=SPECIAL["unk"])
    # not special: decoded outputs keep them, so the generated tokens can be counted from the text
    tokenizer.add_tokens([AddedToken(SPECIAL[k], special=False, normalized=False) for k in ("start", "end", "eot")])
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.padding_side = "left"
    return tokenizer


def build_llm(scale: Scale, device: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**scale.llm, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def build_model(scale: Scale, device: torch.device, dtype: torch.dtype):
    """MultimodalLM.with_adapter (plain LoRA) over a random Llama with the scale's shapes; (model, PromptBuilder)."""
    from micl.adapters import build_peft_config
    from micl.config import LoraArgs
    from micl.modeling.multimodal import MultimodalLM
    from micl.modeling.prompting import PromptBuilder

    torch.manual_seed(0)
    tokenizer = build_tokenizer(scale.llm["vocab_size"])
    llm = build_llm(scale, device, dtype)
    model = MultimodalLM.with_adapter(llm, tokenizer, {"image": scale.vision["hidden_size"]},
                                      build_peft_config(LoraArgs(**scale.lora)))
    model.to(device)
    return model, PromptBuilder(tokenizer, None)  # system_prompt None: the chat template's own, as the paper recipe


def sample_item(builder, scale: Scale, index: int, target: str | None = TARGET, instruction: str = INSTRUCTION):
    encoded = builder.encode(instruction, {"image": scale.media_tokens}, target)
    return {"input_ids": encoded.input_ids, "labels": encoded.labels, "media_mask": encoded.media_mask,
            "media": {"image": torch.randn(scale.media_tokens, scale.vision["hidden_size"])}, "index": index,
            "task": "synth_image_qa"}


def collate(model, items: list[dict], device: torch.device) -> dict:
    from micl.data.collator import MultimodalCollator
    from micl.modeling.multimodal import move_to

    return move_to(MultimodalCollator(model.tokenizer.pad_token_id)(items), device)


def new_tokens(tokenizer, outputs: list[str]) -> float:
    """Mean generated tokens per output (the end token not counted; below max_new_tokens: stopped early)."""
    return statistics.mean(len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in outputs)


def matmul_weights(llm) -> int:
    """N of the MFU: weights of every nn.Linear (base, LoRA, lm_head; a tied lm_head counts once)."""
    seen, total = set(), 0
    for module in llm.modules():
        if isinstance(module, torch.nn.Linear) and id(module.weight) not in seen:
            seen.add(id(module.weight))
            total += module.weight.numel()
    return total


def trainer_step(trainer, model, batch):
    """One optimizer step as the Trainer's loop makes it: training_step, gradient clipping, AdamW."""
    def step():
        # the Trainer's loop: the hooks' inputs and the global item counts first (get_batch_samples)
        batches, items = trainer.get_batch_samples(iter([batch]), 1, trainer.args.device)
        trainer.training_step(model, batches[0], items)
        trainer.accelerator.clip_grad_norm_(model.parameters(), trainer.args.max_grad_norm)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
    return step


def step_times(step, device, scale: Scale, steps: int | None = None) -> list[float]:
    for _ in range(scale.warmup_steps):
        step()
    sync(device)
    return [timed(step, device) for _ in range(steps or scale.timed_steps)]


def summary(times: list[float]) -> dict:
    return {"steps": len(times), "median_s": statistics.median(times), "mean_s": statistics.mean(times),
            "min_s": min(times)}


def release_memory() -> None:
    """After the last reference to a model is gone: its cycles (accelerate binds the forward to the model)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---- stages -------------------------------------------------------------------------------------------
class Bench:
    def __init__(self, scale: Scale, device: torch.device, out: Path, deadline: float, stage_timeout: float):
        self.scale = scale
        self.device = device
        self.dtype = torch.bfloat16
        self.out = out
        self.deadline = deadline
        self.stage_timeout = stage_timeout
        self.memory = PeakMemory(device)
        self.tmp = tempfile.mkdtemp(prefix="micl-bench-gpu-")
        self.data = {"meta": self.meta(), "stages": {}, "targets": []}
        self.started = time.monotonic()  # the deadline counts the stages (imports and start-up come before)

    def meta(self) -> dict:
        import accelerate
        import peft
        import transformers

        import micl

        device = self.device
        return {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "scale": self.scale.name, "device": str(device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "cuda": torch.version.cuda, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "accelerate": accelerate.__version__, "python": platform.python_version(),
            "micl": str(Path(micl.__file__).parent),
            "host": platform.node(), "argv": sys.argv[1:], "shapes": asdict(self.scale),
            "mfu_convention": "MFU (4N FLOPs/token): tokens/s * 4 * N / measured bf16 matmul FLOP/s; N = weights "
                              "of every nn.Linear of the LLM (LoRA, lm_head), not embeddings, projectors, attention "
                              "scores; full fine-tuning would be 6N",
        }

    # ---- bookkeeping --------------------------------------------------------------------------------
    def write(self) -> None:
        self.data["targets"] = self.targets()
        tmp = self.out.with_name(self.out.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str))
        os.replace(tmp, self.out)  # a kill mid-write leaves the previous complete file

    def remaining(self) -> float:
        return self.deadline - (time.monotonic() - self.started)

    def run(self, name: str, fn) -> None:
        entry = {"status": "running", "result": {}}
        self.data["stages"][name] = entry
        limit = min(self.stage_timeout, self.remaining())
        if self.remaining() < MIN_STAGE_SECONDS:
            entry.update(status="skipped", reason=f"deadline: {max(self.remaining(), 0):.0f} s left")
            self.write()
            return
        self.write()
        self.memory.start_stage()
        start = time.perf_counter()
        try:
            signal.signal(signal.SIGALRM, _on_alarm)
            signal.setitimer(signal.ITIMER_REAL, limit)
            try:
                fn(entry["result"])
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            entry["status"] = "ok"
        except StageTimeout:
            entry.update(status="timed_out", reason=f"stopped after {limit:.0f} s; result holds the parts done")
        except Exception as err:  # a stage's failure is recorded, the next stage still runs
            entry.update(status="failed", error=f"{type(err).__name__}: {str(err).strip()[:2000]}",
                         traceback=traceback.format_exc()[-4000:])
        entry["seconds"] = round(time.perf_counter() - start, 2)
        entry["peak_memory_gib"] = self.memory.stage()
        release_memory()  # the stage's models died with its frame
        self.write()
        print(f"[{time.monotonic() - self.started:6.0f} s] {name}: {entry['status']} ({entry['seconds']} s)",
              file=sys.stderr, flush=True)

    def training_args(self, batch_size: int):
        from transformers import TrainingArguments

        # the paper recipe's optimizer settings; bf16 = the mixed precision micl's loop sets for dtype bfloat16
        return TrainingArguments(output_dir=self.tmp, per_device_train_batch_size=batch_size, learning_rate=1e-5,
                                 weight_decay=0.05, report_to=[], remove_unused_columns=False, bf16=True,
                                 dataloader_pin_memory=False, use_cpu=self.device.type == "cpu")

    def micl_trainer(self, model, methods, ctx, batch_size: int):
        """A MiclTrainer whose training_step is called directly; the model is prepared once as Trainer.train
        does (device placement, autocast of forward for bf16 mixed precision); the optimizer is the Trainer's."""
        from micl.training.trainer import MiclTrainer

        trainer = MiclTrainer(model=model, args=self.training_args(batch_size), methods=methods, ctx=ctx)
        trainer.current_gradient_accumulation_steps = 1  # set by the Trainer's loop, which we do not run
        prepared = model if hasattr(model, "_original_forward") else trainer.accelerator.prepare_model(model)
        trainer.create_optimizer()
        return trainer, prepared

    def result(self, stage: str) -> dict:
        entry = self.data["stages"].get(stage) or {}
        return entry.get("result") or {}

    # ---- 1. matmul ------------------------------------------------------------------------------------
    def stage_matmul(self, result: dict) -> None:
        n, device = self.scale.matmul_size, self.device
        a = torch.randn(n, n, device=device, dtype=self.dtype)
        b = torch.randn(n, n, device=device, dtype=self.dtype)
        c = torch.empty(n, n, device=device, dtype=self.dtype)
        inner = 10

        def burst():
            for _ in range(inner):
                torch.matmul(a, b, out=c)

        burst()
        times = [timed(burst, device) / inner for _ in range(self.scale.matmul_repeats)]
        best = min(times)
        result.update(size=n, dtype="bfloat16", matmuls=inner * len(times), best_s=best,
                      tflops=2 * n**3 / best / 1e12, median_tflops=2 * n**3 / statistics.median(times) / 1e12)

    # ---- 2. training throughput -------------------------------------------------------------------------
    def stage_train(self, result: dict) -> None:
        from micl.methods import METHODS

        model, builder = build_model(self.scale, self.device, self.dtype)
        n_weights = matmul_weights(model.llm)
        result["llm_matmul_weights"] = n_weights
        peak = self.result("matmul").get("tflops")
        for batch_size in self.scale.train_batches:
            self.memory.reset()
            trainer, prepared = self.micl_trainer(model, [METHODS["finetune"]()], None, batch_size)
            batch = collate(model, [sample_item(builder, self.scale, i) for i in range(batch_size)], self.device)
            tokens = int(batch["attention_mask"].sum())
            times = step_times(trainer_step(trainer, prepared, batch), self.device, self.scale)
            tokens_per_s = tokens / statistics.mean(times)
            result[f"batch_{batch_size}"] = {
                "batch": list(batch["input_ids"].shape), "tokens_per_step": tokens, **summary(times),
                "tokens_per_s": tokens_per_s,
                "mfu_4n": tokens_per_s * 4 * n_weights / (peak * 1e12) if peak else None,
                "peak_memory_gib": self.memory.part()}
            del trainer, prepared, batch
            release_memory()

    # ---- 3. micl step vs plain PEFT step ----------------------------------------------------------------
    def stage_step_vs_peft(self, result: dict) -> None:
        from transformers import Trainer

        from micl.methods import METHODS

        batch_size = self.scale.ratio_batch
        model, builder = build_model(self.scale, self.device, self.dtype)
        trainer, prepared = self.micl_trainer(model, [METHODS["finetune"]()], None, batch_size)
        batch = collate(model, [sample_item(builder, self.scale, i) for i in range(batch_size)], self.device)
        plain_batch = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                       "labels": batch["labels"]}
        plain = PlainCausalLM(model.llm)
        peft_trainer = Trainer(model=plain, args=self.training_args(batch_size))
        peft_trainer.current_gradient_accumulation_steps = 1
        plain_prepared = peft_trainer.accelerator.prepare_model(plain)
        peft_trainer.optimizer = trainer.optimizer  # the same AdamW: it skips the projectors (no gradients)
        micl_step = trainer_step(trainer, prepared, batch)
        peft_step = trainer_step(peft_trainer, plain_prepared, plain_batch)
        for _ in range(self.scale.warmup_steps):
            micl_step(), peft_step()
        micl_times, peft_times = [], []
        for _ in range(self.scale.timed_steps):  # interleaved: drifts (clocks, heat) hit both alike
            micl_times.append(timed(micl_step, self.device))
            peft_times.append(timed(peft_step, self.device))
            result.update(micl=summary(micl_times), peft=summary(peft_times),
                          ratio=statistics.median(micl_times) / statistics.median(peft_times))
        result.update(batch=list(batch["input_ids"].shape), tokens_per_step=int(batch["attention_mask"].sum()))

    # ---- 4. MoInCL vs fine-tuning -----------------------------------------------------------------------
    def stage_methods(self, result: dict) -> None:
        from micl.data.dataset import EncodedTaskDataset
        from micl.data.prompts import load_templates
        from micl.data.tasks import get_task
        from micl.methods import METHODS, StepContext
        from micl.methods.moincl import MoInCL
        from micl.methods.teacher import PreviousModelTeacher

        batch_size = self.scale.ratio_batch
        model, builder = build_model(self.scale, self.device, self.dtype)
        task, caption_task = get_task("synth_image_qa"), get_task("synth_image_caption")
        samples = [{"id": f"s{i}", "task": task.name, "modality": "image", "task_type": "qa", "media": "",
                    "instruction": INSTRUCTION, "target": TARGET, "references": [TARGET]} for i in range(batch_size)]
        features = [sample_item(builder, self.scale, i)["media"] for i in range(batch_size)]
        dataset = EncodedTaskDataset(samples, features, builder, load_templates(), train=True)

        def collate_cpu(items):  # hooks collate on the host; the Trainer moves their batches
            return collate(model, items, torch.device("cpu"))

        ctx = StepContext(step=1, task=task, seen_tasks=[caption_task], model=model, train_dataset=dataset,
                          run_dir=self.tmp, batch_size=batch_size, collate_fn=collate_cpu)
        batch = collate(model, [dataset[i] for i in range(batch_size)], self.device)
        result.update(batch=list(batch["input_ids"].shape), implementation="micl.methods.moincl.MoInCL + "
                      "micl.methods.teacher.PreviousModelTeacher through MiclTrainer.training_step")
        self.memory.reset()
        trainer, prepared = self.micl_trainer(model, [METHODS["finetune"]()], ctx, batch_size)
        result["finetune"] = {**summary(step_times(trainer_step(trainer, prepared, batch), self.device,
                                                   self.scale)), "peak_memory_gib": self.memory.part()}
        del trainer, prepared
        release_memory()
        self.memory.reset()
        moincl = MoInCL()  # the paper settings: 2 pseudo-target rows, 4 instructions, T = 5
        moincl.teacher = PreviousModelTeacher(model)
        # the pseudo targets are made once per step (teacher captions), not per training step
        moincl.pseudo = [(PSEUDO_INSTRUCTION, PSEUDO_TARGET)] * batch_size
        trainer, prepared = self.micl_trainer(model, [moincl], ctx, batch_size)
        extra = moincl.augment_batch(batch, ctx)["moincl"]  # one student and one teacher pass over each
        result["rows"] = {"main": batch_size, "pseudo": len(extra["pseudo"]["input_ids"]),
                          "instructions": len(extra["instructions"]["input_ids"])}
        result["moincl"] = {**summary(step_times(trainer_step(trainer, prepared, batch), self.device, self.scale)),
                            "peak_memory_gib": self.memory.part()}
        result["step_ratio"] = result["moincl"]["median_s"] / result["finetune"]["median_s"]
        if self.device.type == "cuda":
            result["memory_ratio"] = result["moincl"]["peak_memory_gib"] / result["finetune"]["peak_memory_gib"]
        moincl.teacher.remove()

    # ---- 5. CLIP-L vision tower -------------------------------------------------------------------------
    def stage_clip(self, result: dict) -> None:
        from transformers import CLIPVisionConfig, CLIPVisionModel

        with torch.device(self.device):
            tower = CLIPVisionModel(CLIPVisionConfig(**self.scale.vision)).to(self.dtype).eval()
        size, batch_size = self.scale.vision["image_size"], self.scale.clip_batch
        pixels = torch.randn(batch_size, 3, size, size, device=self.device, dtype=self.dtype)

        @torch.inference_mode()
        def encode():
            states = tower(pixel_values=pixels).last_hidden_state
            return states[:, 1:]  # the patch grid micl pools from (CLS dropped); 256 tokens = the full grid

        shape = list(encode().shape)
        times = [timed(encode, self.device) for _ in range(self.scale.clip_batches)]
        result.update(batch=batch_size, image_size=size, features=shape, **summary(times),
                      images_per_s=batch_size / statistics.median(times))

    # ---- 6. generation ----------------------------------------------------------------------------------
    def stage_generation(self, result: dict) -> None:
        scale = self.scale
        model, builder = build_model(scale, self.device, self.dtype)
        model.eval()
        prompts = [sample_item(builder, scale, i, target=None) for i in range(max(*scale.beam_batches,
                                                                                   scale.greedy_prompts))]
        paper = {"num_beams": scale.beams, "max_new_tokens": scale.max_new_tokens,
                 "repetition_penalty": scale.repetition_penalty}
        result["prompt_tokens"] = len(prompts[0]["input_ids"])
        for batch_size in scale.beam_batches:
            self.memory.reset()
            batch = collate(model, prompts[:batch_size], self.device)
            model.generate(batch, **{**paper, "max_new_tokens": 2})  # warm-up
            outputs = []
            seconds = timed(lambda: outputs.extend(model.generate(batch, **paper)), self.device)
            result[f"beam_batch_{batch_size}"] = {
                **paper, "batch": batch_size, "seconds": seconds, "samples_per_s": batch_size / seconds,
                "mean_new_tokens": new_tokens(model.tokenizer, outputs),
                "peak_memory_gib": self.memory.part()}
        self.memory.reset()
        greedy = {"max_new_tokens": scale.max_new_tokens}
        items = prompts[:scale.greedy_prompts]
        batch = collate(model, items, self.device)
        model.generate(batch, max_new_tokens=2), model.generate(collate(model, items[:1], self.device),
                                                                max_new_tokens=2)
        batched_out = []
        batched = timed(lambda: batched_out.extend(model.generate(batch, **greedy)), self.device)
        row = {**greedy, "prompts": len(items), "batched_s": batched, "one_by_one_done": 0}
        result["greedy"] = row
        singles = [collate(model, [item], self.device) for item in items]
        single_out, start = [], time.perf_counter()
        for single in singles:  # a deadline here leaves the rate of the prompts done
            single_out.extend(model.generate(single, **greedy))
            sync(self.device)
            done = len(single_out)
            elapsed = time.perf_counter() - start
            row.update(one_by_one_done=done, one_by_one_s=elapsed,
                       speedup=(elapsed / done) / (batched / len(items)),
                       same_outputs=sum(a == b for a, b in zip(batched_out, single_out)))
        row["mean_new_tokens"] = new_tokens(model.tokenizer, batched_out)
        row["peak_memory_gib"] = self.memory.part()

    # ---- report ------------------------------------------------------------------------------------------
    def targets(self) -> list[dict]:
        rows = []
        for label, stage, path, op, threshold in TARGETS:
            value = self.result(stage)
            for key in path:
                value = value.get(key) if isinstance(value, dict) else None
            met = None if value is None else (value >= threshold if op == ">=" else value <= threshold)
            if self.scale is not PAPER:
                met = None  # the targets are for the paper shapes on one H200
            rows.append({"measure": label, "value": value, "target": f"{op} {threshold:g}", "met": met})
        return rows

    def table(self) -> str:
        lines = ["| measure | value | target | met |", "|---|---|---|---|"]

        def add(label, value, target="", met=""):
            lines.append(f"| {label} | {value} | {target} | {met} |")

        def fmt(value, spec):
            return "n/a" if value is None else format(value, spec)

        targets = {row["measure"]: row for row in self.targets()}

        def add_target(label, value_text):
            row = targets[label]
            add(label, value_text, row["target"], {True: "yes", False: "no", None: "n/a"}[row["met"]])

        meta = self.data["meta"]
        add("device", meta["gpu"] or meta["device"])
        for name, entry in self.data["stages"].items():
            if entry["status"] != "ok":
                add(f"stage {name}", entry["status"], "", entry.get("error", entry.get("reason", ""))[:80])
        mm = self.result("matmul")
        add("bf16 matmul TFLOP/s (best)", fmt(mm.get("tflops"), ".1f"))
        train = self.result("train")
        for b in self.scale.train_batches:
            row = train.get(f"batch_{b}", {})
            add(f"train tokens/s, batch {b}", fmt(row.get("tokens_per_s"), ".0f"))
            if b == 32:
                add_target("MFU (4N FLOPs/token), batch 32", fmt(row.get("mfu_4n"), ".3f"))
            else:
                add(f"MFU (4N FLOPs/token), batch {b}", fmt(row.get("mfu_4n"), ".3f"))
            add(f"peak GPU memory GiB, train batch {b}", fmt(row.get("peak_memory_gib"), ".1f"))
        add_target("micl step / PEFT LoRA step", fmt(self.result("step_vs_peft").get("ratio"), ".3f"))
        methods = self.result("methods")
        add("MoInCL step / fine-tuning step", fmt(methods.get("step_ratio"), ".2f"))
        add("MoInCL peak memory / fine-tuning", fmt(methods.get("memory_ratio"), ".2f"))
        add_target("CLIP-L encoding images/s", fmt(self.result("clip").get("images_per_s"), ".0f"))
        gen = self.result("generation")
        for b in self.scale.beam_batches:
            add(f"beam {self.scale.beams} generation samples/s, batch {b}",
                fmt(gen.get(f"beam_batch_{b}", {}).get("samples_per_s"), ".2f"))
        add_target("greedy batched / one-by-one generation", fmt(gen.get("greedy", {}).get("speedup"), ".1f"))
        for name, entry in self.data["stages"].items():
            add(f"peak GPU memory GiB, stage {name}", fmt(entry.get("peak_memory_gib"), ".1f"))
        return "\n".join(lines)


class PlainCausalLM(torch.nn.Module):
    """The PEFT LLM alone, as a plain LoRA user trains it; a wrapper so that preparing it for mixed precision
    (accelerate replaces the forward of the module it is given) leaves the shared LLM's forward as it is."""

    def __init__(self, llm):
        super().__init__()
        self.llm = llm

    def forward(self, input_ids, attention_mask, labels=None):
        return self.llm(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (a 2-layer Llama, a tiny CLIP), seconds")
    parser.add_argument("--out", default="bench_results_gpu.json")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    parser.add_argument("--deadline", type=float, default=420.0,
                        help="seconds for all stages (counted after start-up); a stage that would start with less than "
                             f"{MIN_STAGE_SECONDS:g} s left is skipped, a running one is stopped at it (default 420)")
    parser.add_argument("--timeout-per-stage", type=float, default=240.0, help="seconds per stage (default 240)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    args = parser.parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        parser.error(f"--stages: unknown stage(s) {', '.join(unknown)}; valid: {', '.join(STAGES)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    scale = TINY if args.tiny else PAPER
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    bench = Bench(scale, device, out, args.deadline, args.timeout_per_stage)
    for name in STAGES:  # the fixed order (generation last: the longest)
        if name in stages:
            bench.run(name, getattr(bench, f"stage_{name}"))
    bench.write()
    print(bench.table())
    print(f"\nJSON: {out}")
    return 0 if all(e["status"] == "ok" for e in bench.data["stages"].values()) else 1


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
