"""Performance benchmark of micl on the embedded default (CPU). Prints a table and writes JSON.

Ratios are measured side by side in one process (absolute times on shared machines are noise):
  train_throughput   micl training tokens/s; MFU against a float32 matmul measured here
  step_vs_peft       micl step (projectors + media scatter + LoRA LLM) / plain PEFT LoRA step, same tokens
  generation         batched generation (KV cache) vs one prompt at a time
  feature_cache      encoder time on the second epoch (feature store) / first epoch
  methods            MoInCL training step / sequential fine-tuning step on the same batch, and peak RSS
                     (one process each; the teacher is a second adapter, not a second model)
  sharded_eval       evaluation in 2 processes x 1 thread vs 1 x 1, each process generating every other batch
                     (only with --eval-shard)
  host_syncs         (in methods) tensor reads that make a GPU host wait, counted in one training step
  moe_lora           MoE LoRA (10 experts, top-2) / one LoRA of the same rank: forward of the whole model and
                     of one adapted q_proj, same batch (only with --moe)
  e2e_quick, e2e_default   wall time of `micl train recipes/quick.yaml` / `recipes/finetune.yaml`
                     (only with --e2e; subprocesses, fresh output folders)
  memory             peak RSS and training samples/s of a one-task run (encoding + one epoch + evaluation)
                     at 1k, 4k and 16k rows of 256 x 1024-d features, 5 rows per media item (Flickr30k's
                     layout), synthetic encoder, tiny Llama: one subprocess per size (only with --memory,
                     which runs nothing else; docs/feature_store.md)

    python scripts/bench.py [--e2e] [--moe] [--out bench_results.json]
    python scripts/bench.py --memory [--rows 1000 4000 16000] [--out bench_memory.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from functools import cached_property
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


class HostSyncCounter(torch.overrides.TorchFunctionMode):
    """Counts the tensor operations that make the host wait for the device on a GPU (a value read back:
    .item(), .tolist(), bool()/int()/float() of a tensor, .cpu()/.numpy(), nonzero and boolean-mask
    indexing, whose output size depends on the data). On the CPU nothing waits, but the count of the same
    calls is what a GPU step would synchronise on. Sites outside micl (transformers, PEFT, torch) count too."""

    READS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy", "nonzero",
             "masked_select", "unique", "argwhere", "nonzero_static"}

    def __init__(self):
        super().__init__()
        self.calls: dict[str, int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        boolean_index = name == "__getitem__" and len(args) > 1 and self._has_bool_tensor(args[1])
        if name in self.READS or boolean_index:
            import traceback

            frame = next((f for f in reversed(traceback.extract_stack()[:-1]) if "overrides" not in f.filename), None)
            site = f"{name} {Path(frame.filename).name}:{frame.lineno}" if frame else name
            self.calls[site] = self.calls.get(site, 0) + 1
        return func(*args, **(kwargs or {}))

    @staticmethod
    def _has_bool_tensor(index) -> bool:
        items = index if isinstance(index, tuple) else (index,)
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)

    @property
    def total(self) -> int:
        return sum(self.calls.values())

    def sites(self) -> dict[str, int]:
        return dict(sorted(self.calls.items(), key=lambda kv: -kv[1]))

    def in_micl(self) -> int:
        return sum(n for site, n in self.calls.items() if site.split(" ")[1].split(":")[0] in self.micl_files)

    @cached_property
    def micl_files(self) -> set[str]:
        return {p.name for p in (REPO / "micl").rglob("*.py")}


def timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def matmul_flops(size: int = 1024, repeats: int = 20) -> float:
    """Peak float32 matmul FLOP/s: the best of many runs (a shared machine only ever slows it down)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    seconds = min(timed(lambda: a @ b, repeats))
    return 2 * size**3 / seconds


def load_default():
    from micl.adapters import build_peft_config
    from micl.config import LoraArgs
    from micl.modeling.llm import load_llm
    from micl.modeling.multimodal import MultimodalLM
    from micl.modeling.prompting import PromptBuilder

    torch.manual_seed(0)
    llm, tokenizer = load_llm("smollm2-135m-instruct")
    model = MultimodalLM.with_adapter(llm, tokenizer, {"image": 1280}, build_peft_config(LoraArgs(dropout=0.0)))
    return model, PromptBuilder(tokenizer, "")


def training_batch(model, builder, batch_size: int, length: int, media_tokens: int = 9):
    from micl.data.collator import MultimodalCollator

    tokenizer = model.tokenizer
    filler = " ".join(["a red circle on the left and a blue square moving up."] * 40)
    examples = []
    for i in range(batch_size):
        enc = builder.encode(f"describe the image. #{i}", {"image": media_tokens}, filler)
        keep = length
        examples.append({"input_ids": enc.input_ids[:keep], "labels": enc.labels[:keep],
                         "media_mask": enc.media_mask[:keep], "media": {"image": torch.randn(media_tokens, 1280)}})
    return MultimodalCollator(tokenizer.pad_token_id)(examples)


def bench_steps(model, builder, batch_size=8, length=128, repeats=6) -> dict:
    batch = training_batch(model, builder, batch_size, length)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    plain = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": batch["labels"]}

    def micl_step():
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    def peft_step():
        model.llm(**plain).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    micl_step(), peft_step()  # warm-up
    micl_times, peft_times = [], []
    for _ in range(repeats):  # interleaved so machine noise hits both alike
        micl_times += timed(micl_step, 1)
        peft_times += timed(peft_step, 1)
    tokens = int(batch["attention_mask"].sum())
    micl_s, peft_s = statistics.median(micl_times), statistics.median(peft_times)
    return {"tokens_per_step": tokens, "micl_step_s": micl_s, "peft_step_s": peft_s,
            "ratio": micl_s / peft_s, "tokens_per_s": tokens / micl_s}


def bench_generation(model, builder, prompts=16, max_new_tokens=16) -> dict:
    from micl.data.collator import MultimodalCollator

    torch.manual_seed(0)
    examples = []
    for i in range(prompts):
        enc = builder.encode("describe the image.", {"image": 9})
        examples.append({"input_ids": enc.input_ids, "labels": None, "media_mask": enc.media_mask,
                         "media": {"image": torch.randn(9, 1280)}})
    collate = MultimodalCollator(model.tokenizer.pad_token_id)
    model.eval()
    batched_out = []
    batched = timed(lambda: batched_out.extend(model.generate(collate(examples), max_new_tokens=max_new_tokens)), 1)[0]
    single_out = []
    single = timed(lambda: [single_out.extend(model.generate(collate([e]), max_new_tokens=max_new_tokens))
                            for e in examples], 1)[0]
    model.train()
    return {"prompts": prompts, "batched_s": batched, "one_by_one_s": single, "speedup": single / batched,
            "same_outputs": batched_out == single_out}


def bench_feature_cache(n=16) -> dict:
    from micl.config import ModelArgs
    from micl.data.synth import generate_synth
    from micl.modeling.encoders.registry import build_encoders
    from micl.modeling.feature_store import FeatureStores

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "synth"
        generate_synth(root, seed=0, n_train=n, n_val=2, n_test=2, tasks=["synth_image_caption", "synth_audio_qa"])
        encoders = build_encoders(ModelArgs())
        rows = {}
        for task, modality in (("synth_image_caption", "image"), ("synth_audio_qa", "audio")):
            paths = sorted(str(p) for p in (root / "media" / task / "train").iterdir())
            encoders[modality].encode([encoders[modality].load(paths[0])])  # load weights outside the timing
            stores = FeatureStores(Path(tmp) / "cache")

            def epoch():
                features = stores.features(encoders[modality], paths)
                return [features[i] for i in range(len(features))]

            first = timed(epoch, 1)[0]
            second = timed(epoch, 1)[0]
            rows[modality] = {"items": len(paths), "epoch1_s": first, "epoch2_s": second, "ratio": second / first}
        return rows


MEMORY_TOKENS, MEMORY_DIM, ROWS_PER_ITEM = 256, 1024, 5


def write_caption_task(root: Path, task: str, split: str, rows: int, per_item: int) -> None:
    """`rows` caption rows over rows / per_item distinct media files (small distinct files: the synthetic encoder
    draws features from their bytes)."""
    media = root / "media" / task / split
    media.mkdir(parents=True, exist_ok=True)
    with open(root / task / f"{split}.jsonl", "w") as handle:
        for row in range(rows):
            item = row // per_item
            path = media / f"{item:06d}.bin"
            if row % per_item == 0:
                path.write_bytes(f"{split}:{item}".encode() * 8)
            caption = f"picture {item} caption {row % per_item}"
            handle.write(json.dumps({"id": f"{split}-{row}", "task": task, "modality": "image", "task_type": "caption",
                                     "media": str(path.relative_to(root)), "instruction": "", "target": caption,
                                     "references": [caption]}) + "\n")


def tiny_word_tokenizer():
    """A word-level tokenizer of a few dozen tokens (digits one by one, no chat template): with the 49k-token
    vocabulary of the embedded LLM the logits of every position would dominate a tiny Llama's step."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<pad>", "<s>", "</s>", *"0123456789", *":.,?!", "User", "Assistant", "image", "picture",
             "caption", "describe", "the", "a", "an", "of", "this", "in", "one", "sentence", "briefly", "what", "is"]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(),
                                                       pre_tokenizers.Digits(individual_digits=True)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", pad_token="<pad>",
                                   bos_token="<s>", eos_token="</s>")


def batch_clock():
    """A method whose only hook times the training batches: samples/s of the epoch after its first 10% of
    batches (the Trainer's setup and warm-up are a fixed cost that would favour the larger sizes)."""
    from micl.methods.base import ContinualMethod

    class BatchClock(ContinualMethod):
        name = "batch_clock"

        def __init__(self):
            super().__init__()
            self.times: list[float] = []
            self.sizes: list[int] = []

        def augment_batch(self, batch, ctx):
            self.times.append(time.perf_counter())
            self.sizes.append(len(batch["input_ids"]))
            return batch

        def steady_samples_per_s(self) -> float:
            start = len(self.times) // 10
            return sum(self.sizes[start:-1]) / (self.times[-1] - self.times[start])

    return BatchClock()


def memory_child(rows: int, feature_dtype: str = "float32") -> dict:
    """One process: a one-task `ContinualRun` (flickr30k's layout: `rows` training rows, 5 per media item, 256 x
    1024-d synthetic features, a 2-layer Llama of width 64 with a word-level vocabulary), from a cold feature store: encoding, one epoch, the
    evaluation of rows / 16 test samples. Peak RSS is this process's ru_maxrss."""
    import resource

    from transformers import LlamaConfig, LlamaForCausalLM

    from micl.config import load_recipe
    from micl.modeling.encoders.synthetic import SyntheticEncoder

    tmp = Path(tempfile.mkdtemp(prefix="micl-memory-"))
    os.environ["MICL_CACHE_DIR"] = str(tmp / "cache")  # a cold feature store
    tokenizer = tiny_word_tokenizer()
    torch.manual_seed(0)
    llm = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True))
    llm.save_pretrained(tmp / "llm")
    tokenizer.save_pretrained(tmp / "llm")
    del llm
    task, data = "flickr30k", tmp / "data"
    (data / task).mkdir(parents=True)
    write_caption_task(data, task, "train", rows, ROWS_PER_ITEM)
    write_caption_task(data, task, "test", max(1, rows // 16), 1)
    config = load_recipe(REPO / "recipes" / "finetune.yaml", [
        f"output_dir={tmp / 'run'}", f"data.root={data}", f"order=[{task}]", f"model.llm={tmp / 'llm'}",
        f"model.feature_dtype={feature_dtype}", "data.max_train_samples=null", "data.max_eval_samples=null",
        "train.epochs=1", "train.batch_size=8", "train.save_steps=1000000",
        "train.logging_steps=1000000", "train.tensorboard=false", "eval.forward_transfer=false",
        "eval.batch_size=16", "eval.max_new_tokens=2"])

    from micl.training.loop import ContinualRun

    run = ContinualRun(config)
    clock = batch_clock()
    run.methods.append(clock)
    encoder = SyntheticEncoder("image", tokens=MEMORY_TOKENS, dim=MEMORY_DIM)
    encoder.batch_size = config.model.encoder_batch_size
    run.data._encoders = {"image": encoder}
    run.model  # noqa: B018 (the LLM and projector, before any feature exists)
    before_data = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    started = time.perf_counter()
    trained = len(run.dataset(run.tasks[0], "train"))
    encode_s = time.perf_counter() - started
    results = run.run()
    step = results["steps"][0]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    stored = sum(f.stat().st_size for f in (tmp / "cache" / "feature_store").glob("*/features.bin"))  # all splits
    subprocess.run(["rm", "-rf", str(tmp)], check=True)
    assert trained == rows, f"{trained} training rows, expected {rows}"
    assert sum(clock.sizes) == rows, f"{sum(clock.sizes)} samples trained, expected {rows}"
    return {"rows": rows, "items": run.feature_stores.encoded, "feature_dtype": feature_dtype,
            "peak_rss_mb": peak / 2**20, "rss_before_data_mb": before_data / 2**20, "encode_s": encode_s,
            "train_s": step["train_runtime_s"], "samples_per_s": clock.steady_samples_per_s(),
            "samples_per_s_with_setup": rows / step["train_runtime_s"],
            "store_mb": stored / 2**20,
            "old_features_mb": rows * MEMORY_TOKENS * MEMORY_DIM * 4 / 2**20}  # a float32 tensor per row, in RAM


def bench_memory(sizes=(1000, 4000, 16000), threads: int = 2, feature_dtype: str = "float32") -> dict:
    """`memory_child` in a fresh subprocess per size; growth of peak RSS and samples/s from the smallest size."""
    rows = []
    for size in sizes:
        out = subprocess.run([sys.executable, __file__, "--memory-child", str(size), "--threads", str(threads),
                              "--feature-dtype", feature_dtype], check=True, capture_output=True, text=True,
                             cwd=REPO).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    first = rows[0]
    for row in rows:
        row["rss_vs_smallest"] = row["peak_rss_mb"] / first["peak_rss_mb"]
        row["samples_per_s_vs_smallest"] = row["samples_per_s"] / first["samples_per_s"]
    return {"rows": rows, "tokens": MEMORY_TOKENS, "dim": MEMORY_DIM, "rows_per_item": ROWS_PER_ITEM,
            "threads": threads, "torch": torch.__version__}


def print_memory(results: dict) -> None:
    print("\n| rows | media items | peak RSS (MiB) | RSS / 1k | samples/s | samples/s / 1k | encode s | store (MiB) "
          "| old: features in RAM (MiB) |\n|---|---|---|---|---|---|---|---|---|")
    for r in results["rows"]:
        print(f"| {r['rows']} | {r['items']} | {r['peak_rss_mb']:.0f} | {r['rss_vs_smallest']:.3f} | "
              f"{r['samples_per_s']:.1f} | {r['samples_per_s_vs_smallest']:.3f} | {r['encode_s']:.1f} | "
              f"{r['store_mb']:.0f} | {r['old_features_mb']:.0f} |")


def method_step_child(method_name: str, steps: int = 6, media_tokens: int = 9) -> dict:
    """One process per method (peak RSS is per process): training steps of a method on the same batch.
    MoInCL runs with its teacher adapter, 2 pseudo-target duplicates and 4 distilled instructions."""
    import resource

    from micl.data.collator import MultimodalCollator
    from micl.data.dataset import EncodedTaskDataset
    from micl.data.prompts import load_templates
    from micl.data.tasks import get_task
    from micl.methods import METHODS, StepContext
    from micl.training.trainer import MiclTrainer
    from transformers import TrainingArguments

    model, builder = load_default()
    task = get_task("synth_image_qa")
    torch.manual_seed(0)
    samples = [{"id": f"s{i}", "task": task.name, "modality": "image", "task_type": "qa", "media": "",
                "instruction": "what color is the shape?", "target": "red", "references": ["red"]}
               for i in range(8)]
    dataset = EncodedTaskDataset(samples, [{"image": torch.randn(media_tokens, 1280)} for _ in samples], builder, load_templates(),
                                 train=True)
    collate = MultimodalCollator(model.tokenizer.pad_token_id)
    caption_task = get_task("synth_image_caption")
    ctx = StepContext(step=1, task=task, seen_tasks=[caption_task], model=model, train_dataset=dataset,
                      run_dir=tempfile.mkdtemp(), batch_size=8, collate_fn=collate)
    method = METHODS[method_name]()
    if method_name == "moincl":
        from micl.methods.teacher import PreviousModelTeacher

        method.teacher = PreviousModelTeacher(model)  # the step's captions are not part of a step's cost
        method.pseudo = [("describe the image.", "a red circle on the left.")] * len(samples)
    batch = collate([dataset[i] for i in range(len(samples))])
    # the Trainer's own training step (hooks, auxiliary losses backpropagated one by one), our optimizer
    args = TrainingArguments(output_dir=ctx.run_dir, per_device_train_batch_size=8, report_to=[],
                             remove_unused_columns=False)
    trainer = MiclTrainer(model=model, args=args, methods=[method], ctx=ctx)
    trainer.current_gradient_accumulation_steps = 1  # set by the Trainer's loop, which we do not run
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def forward_backward():
        # what the Trainer's loop does per optimizer step: the hooks' inputs and the global item counts
        # (get_batch_samples), then the training step
        batches, items = trainer.get_batch_samples(iter([batch]), 1, trainer.args.device)
        trainer.training_step(model, batches[0], items)

    def step():
        forward_backward()
        optimizer.step()
        optimizer.zero_grad()

    step()
    times = timed(step, steps)
    # trained tokens: the real (non-padding) tokens that go through the student's forward and backward: the
    # batch's, plus the rows a method adds (MoInCL's pseudo-target duplicates and instructions)
    augmented, _ = trainer.get_batch_samples(iter([batch]), 1, trainer.args.device)
    trained_tokens = int(batch["attention_mask"].sum())
    for rows in augmented[0].get("moincl", {}).values():
        trained_tokens += int(rows["attention_mask"].sum())
    with HostSyncCounter() as syncs:  # micl's part of the step (torch's AdamW reads its step counts on the host)
        forward_backward()
    optimizer.zero_grad()
    return {"method": method_name, "step_s": statistics.median(times), "trained_tokens": trained_tokens,
            "trained_tokens_per_s": trained_tokens / statistics.median(times),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "host_syncs": syncs.total, "host_syncs_in_micl": syncs.in_micl(), "host_sync_sites": syncs.sites()}


def bench_methods(threads: int, media_tokens: int = 9) -> dict:
    rows = {}
    for name in ("finetune", "moincl"):
        out = subprocess.run([sys.executable, __file__, "--method-step", name, "--threads", str(threads),
                              "--media-tokens", str(media_tokens)],
                             check=True, capture_output=True, text=True, cwd=REPO).stdout
        rows[name] = json.loads(out.strip().splitlines()[-1])
    rows["step_ratio"] = rows["moincl"]["step_s"] / rows["finetune"]["step_s"]
    rows["rss_ratio"] = rows["moincl"]["peak_rss_mb"] / rows["finetune"]["peak_rss_mb"]
    rows["trained_tokens_ratio"] = rows["moincl"]["trained_tokens"] / rows["finetune"]["trained_tokens"]
    rows["tokens_per_s_ratio"] = rows["moincl"]["trained_tokens_per_s"] / rows["finetune"]["trained_tokens_per_s"]
    return rows


def eval_child(samples: int, batch_size: int, max_new_tokens: int) -> dict:
    """One process of bench_sharded_eval (under torchrun for 2 processes): generation over the same prompts
    (random image features, fixed seed) with each process taking its share of the batches."""
    from types import SimpleNamespace

    from micl.data.dataset import EncodedTaskDataset
    from micl.data.prompts import load_templates
    from micl.training.evaluation import generate_predictions
    from micl.utils.distributed import barrier, init_distributed, is_main_process, world_size

    init_distributed()
    model, builder = load_default()
    model.eval()
    generator = torch.Generator().manual_seed(0)
    rows = [{"id": f"s{i}", "task": "synth_image_caption", "modality": "image", "task_type": "caption",
             "media": "", "instruction": "", "target": "", "references": [""]} for i in range(samples)]
    features = [{"image": torch.randn(9, 1280, generator=generator)} for _ in rows]
    dataset = EncodedTaskDataset(rows, features, builder, load_templates(), train=False)
    settings = SimpleNamespace(batch_size=batch_size, max_new_tokens=max_new_tokens, num_beams=1,
                               repetition_penalty=1.0)
    generate_predictions(model, dataset, SimpleNamespace(**{**vars(settings), "max_new_tokens": 2}), sharded=True)
    barrier()
    start = time.perf_counter()
    predictions = generate_predictions(model, dataset, settings, sharded=True)
    barrier()
    seconds = time.perf_counter() - start
    return {"processes": world_size(), "seconds": seconds, "samples_per_s": samples / seconds,
            "predictions": predictions, "main": is_main_process()}


def bench_sharded_eval(samples: int = 64, batch_size: int = 8, max_new_tokens: int = 16) -> dict:
    """Evaluation (batched greedy generation, embedded default) in 1 process x 1 thread and in 2 processes x
    1 thread (torchrun, gloo), each process generating every other batch; run one after the other."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    args = ["--eval-child", f"{samples},{batch_size},{max_new_tokens}", "--threads", "1"]
    rows = {}
    for processes in (1, 2):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "eval.json"
            launcher = ([sys.executable] if processes == 1 else
                        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)])
            subprocess.run([*launcher, __file__, *args, "--out", str(out)], check=True, cwd=REPO, env=env)
            rows[processes] = json.loads(out.read_text())
    return {"samples": samples, "batch_size": batch_size, "max_new_tokens": max_new_tokens,
            "one_process_s": rows[1]["seconds"], "two_processes_s": rows[2]["seconds"],
            "speedup": rows[1]["seconds"] / rows[2]["seconds"],
            "same_predictions": rows[1]["predictions"] == rows[2]["predictions"]}


def bench_moe(repeats: int = 7, batch_size: int = 8, length: int = 128) -> dict:
    """MoE LoRA (E = 10 experts, top-2, token routing) vs one LoRA of the same rank (r = 8, q/v), embedded
    default, the same training batch: whole-model forward (training mode, autograd on) and one adapted
    q_proj alone on the same hidden states ([batch, length, 576]); medians of interleaved repeats."""
    from micl.adapters.moe_lora import MoeLoraConfig, moe_layers
    from micl.adapters import build_peft_config
    from micl.config import LoraArgs
    from micl.modeling.llm import load_llm
    from micl.modeling.multimodal import MultimodalLM
    from micl.modeling.prompting import PromptBuilder

    torch.manual_seed(0)
    lora = LoraArgs(dropout=0.0)
    llm, tokenizer = load_llm("smollm2-135m-instruct")
    single = MultimodalLM.with_adapter(llm, tokenizer, {"image": 1280}, build_peft_config(lora))
    llm2, _ = load_llm("smollm2-135m-instruct")
    moe_config = MoeLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=0.0,
                               target_modules=list(lora.target_modules), task_type="CAUSAL_LM", num_experts=10,
                               top_k=2, routing="token", init_weights=False)
    moe = MultimodalLM.with_adapter(llm2, tokenizer, {"image": 1280}, moe_config)
    moe.projectors.load_state_dict(single.projectors.state_dict())
    batch = training_batch(single, PromptBuilder(tokenizer, ""), batch_size, length)
    single.train(), moe.train()

    def forward(model):
        return lambda: model(**batch).loss

    name, moe_layer = next(iter(moe_layers(moe.llm).items()))
    lora_layer = dict(single.llm.named_modules())[name]
    hidden = torch.randn(batch_size, length, moe_layer.in_features)
    base = lora_layer.base_layer
    model_cases = {"model_lora": forward(single), "model_moe": forward(moe)}
    layer_cases = {"layer_lora": lambda: lora_layer(hidden), "layer_moe": lambda: moe_layer(hidden),
                   "layer_base": lambda: base(hidden)}
    times = {}
    for cases, n in ((model_cases, repeats), (layer_cases, 10 * repeats)):  # a layer call is ~250x shorter
        for fn in cases.values():  # warm-up
            fn()
        times.update({key: [] for key in cases})
        for _ in range(n):  # interleaved so machine noise hits all alike
            for key, fn in cases.items():
                times[key] += timed(fn, 1)
    med = {key: statistics.median(values) for key, values in times.items()}
    return {"median_s": med, "model_ratio": med["model_moe"] / med["model_lora"],
            "layer_ratio": med["layer_moe"] / med["layer_lora"],
            "adapter_only_ratio": ((med["layer_moe"] - med["layer_base"])
                                   / max(med["layer_lora"] - med["layer_base"], 1e-9)),
            "batch": [batch_size, length], "experts": 10, "top_k": 2, "r": lora.r, "repeats": repeats}


def bench_e2e(preset: str) -> dict:
    recipe = {"quick": "quick.yaml", "default": "finetune.yaml"}[preset]
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "micl", "train", str(REPO / "recipes" / recipe),
                   f"output_dir={tmp}/run", f"data.root={tmp}/synth"]
        # a cold feature cache (as a new user has), but the already converted LLM
        from micl.modeling.llm import cache_root

        env = {**os.environ, "MICL_CACHE_DIR": f"{tmp}/cache"}
        os.makedirs(f"{tmp}/cache")
        os.symlink(cache_root() / "models", f"{tmp}/cache/models")
        start = time.perf_counter()
        subprocess.run(command, check=True, cwd=REPO, env=env)
        wall = time.perf_counter() - start
        results = json.loads((Path(tmp) / "run" / "results.json").read_text())
    return {"wall_s": wall, "average": results["average"], "forgetting": results["forgetting"],
            "tasks": len(results["tasks"])}


def bench_distributed() -> dict:
    """scripts/bench_distributed.py in a subprocess (it launches the 2-process runs itself)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "distributed.json"
        subprocess.run([sys.executable, str(REPO / "scripts" / "bench_distributed.py"), "--out", str(out)],
                       check=True, cwd=REPO)
        return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--e2e", action="store_true", help="also time whole `micl train` runs (minutes)")
    parser.add_argument("--distributed", action="store_true",
                        help="also run scripts/bench_distributed.py (ZeRO-3 memory, 1 vs 2 processes; minutes)")
    parser.add_argument("--moe", action="store_true",
                        help="also time MoE LoRA (10 experts, top-2) vs one LoRA of the same rank (~2 min)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="bench_results.json")
    parser.add_argument("--eval-shard", action="store_true",
                        help="also time evaluation in 2 processes x 1 thread vs 1 x 1 (~2 min)")
    parser.add_argument("--memory", action="store_true",
                        help="only the feature-store memory benchmark (peak RSS vs rows; minutes)")
    parser.add_argument("--rows", type=int, nargs="+", default=[1000, 4000, 16000], help="--memory: sizes")
    parser.add_argument("--feature-dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="--memory: model.feature_dtype")
    parser.add_argument("--methods", action="store_true",
                        help="only MoInCL vs fine-tuning (step time, trained tokens/s, peak RSS; ~3 min)")
    parser.add_argument("--media-tokens", type=int, default=9,
                        help="--methods: image tokens per sample (micl-synth: 9; the paper's CLIP towers: 256)")
    parser.add_argument("--method-step", help=argparse.SUPPRESS)  # child process of bench_methods
    parser.add_argument("--eval-child", help=argparse.SUPPRESS)  # child process of bench_sharded_eval
    parser.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)  # child process of bench_memory
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.method_step:
        print(json.dumps(method_step_child(args.method_step, media_tokens=args.media_tokens)))
        return
    if args.eval_child:
        result = eval_child(*map(int, args.eval_child.split(",")))
        if result["main"]:
            Path(args.out).write_text(json.dumps(result))
        return
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, args.feature_dtype)))
        return
    if args.methods:
        results = {"threads": args.threads, "torch": torch.__version__, "media_tokens": args.media_tokens,
                   "methods": bench_methods(args.threads, args.media_tokens)}
        Path(args.out).write_text(json.dumps(results, indent=2))
        m = results["methods"]
        print("| measure | value | target |\n|---|---|---|")
        print(f"| MoInCL step / fine-tuning step | {m['step_ratio']:.2f} | |")
        print(f"| MoInCL trained tokens / fine-tuning's | {m['trained_tokens_ratio']:.2f} | |")
        print(f"| MoInCL trained tokens/s / fine-tuning's | {m['tokens_per_s_ratio']:.2f} | >= 0.85 |")
        print(f"| MoInCL peak RSS / fine-tuning | {m['rss_ratio']:.2f} | <= 1.1 |")
        print(f"\nJSON: {args.out}")
        return
    if args.memory:
        memory = bench_memory(args.rows, args.threads, args.feature_dtype)
        print_memory(memory)
        Path(args.out).write_text(json.dumps({"memory": memory}, indent=2))
        print(f"\nJSON: {args.out}")
        return

    results = {"threads": args.threads, "torch": torch.__version__}
    model, builder = load_default()
    n_params = sum(p.numel() for p in model.llm.parameters())
    peak = matmul_flops()
    steps = bench_steps(model, builder)
    peak = max(peak, matmul_flops())  # measured on both sides of the training steps
    results["matmul_gflops"] = peak / 1e9
    results["step_vs_peft"] = steps
    # model FLOPs per trained token: 6N (PaLM MFU convention); a frozen base needs ~4N in practice
    results["train_throughput"] = {"tokens_per_s": steps["tokens_per_s"], "llm_params": n_params,
                                   "mfu_6n": steps["tokens_per_s"] * 6 * n_params / peak,
                                   "mfu_4n": steps["tokens_per_s"] * 4 * n_params / peak}
    results["generation"] = bench_generation(model, builder)
    results["feature_cache"] = bench_feature_cache()
    results["methods"] = bench_methods(args.threads)
    if args.moe:
        results["moe_lora"] = bench_moe()
    if args.e2e:
        results["e2e_quick"] = bench_e2e("quick")
        results["e2e_default"] = bench_e2e("default")
    if args.distributed:
        results["distributed"] = bench_distributed()
    if args.eval_shard:
        results["sharded_eval"] = bench_sharded_eval()

    rows = [
        ("train tokens/s (batch 8 x 128)", f"{results['train_throughput']['tokens_per_s']:.0f}", ""),
        ("float32 matmul GFLOP/s", f"{results['matmul_gflops']:.1f}", ""),
        ("MFU (6N / 4N per token)", f"{results['train_throughput']['mfu_6n']:.2f} / "
                                    f"{results['train_throughput']['mfu_4n']:.2f}", ""),
        ("micl step / PEFT LoRA step", f"{steps['ratio']:.3f}", "<= 1.15"),
        ("batched vs one-by-one generation", f"{results['generation']['speedup']:.1f}x", ">= 4x"),
    ]
    rows.append(("MoInCL step / fine-tuning step", f"{results['methods']['step_ratio']:.2f}", ""))
    rows.append(("MoInCL trained tokens / fine-tuning's, same batch", f"{results['methods']['trained_tokens_ratio']:.2f}", ""))
    rows.append(("MoInCL trained tokens/s / fine-tuning's", f"{results['methods']['tokens_per_s_ratio']:.2f}", ">= 0.85"))
    rows.append(("MoInCL peak RSS / fine-tuning", f"{results['methods']['rss_ratio']:.2f}", "<= 1.1"))
    for name in ("finetune", "moincl"):
        row = results["methods"][name]
        rows.append((f"host syncs per {name} training step: micl / all (transformers' mask checks)",
                     f"{row['host_syncs_in_micl']} / {row['host_syncs']}", "0 in micl"))
    if "moe_lora" in results:
        rows.append(("MoE LoRA (E=10, top-2) / LoRA forward: whole model", f"{results['moe_lora']['model_ratio']:.2f}",
                     "<= 1.5"))
        rows.append(("MoE LoRA / LoRA forward: adapted q_proj (base + adapter)",
                     f"{results['moe_lora']['layer_ratio']:.2f}", ""))
        rows.append(("MoE LoRA / LoRA forward: adapter path alone (layer - base)",
                     f"{results['moe_lora']['adapter_only_ratio']:.2f}", ""))
    for modality, row in results["feature_cache"].items():
        rows.append((f"{modality} encoder time epoch 2 / epoch 1", f"{row['ratio']:.4f}", "~0"))
    for preset, target in (("quick", "<= 180 s"), ("default", "<= 900 s")):
        if f"e2e_{preset}" in results:
            rows.append((f"wall time, {preset} recipe", f"{results[f'e2e_{preset}']['wall_s']:.0f} s", target))
    if "sharded_eval" in results:
        row = results["sharded_eval"]
        rows.append(("evaluation, 2 processes x 1 thread / 1 x 1 (same predictions: "
                     f"{row['same_predictions']})", f"{row['speedup']:.2f}x", ">= 1.6x"))
    for row in results.get("distributed", {}).get("rows", [])[1:]:
        rows.append((f"{row['run']}, 2 processes: memory per process / 1 process", f"{row['memory_vs_single']:.3f}",
                     "<= 0.6" if row["run"] == "zero3" else ""))
        rows.append((f"{row['run']}, 2 processes: throughput / 1 process", f"{row['throughput_vs_single']:.2f}x", ""))
    width = max(len(r[0]) for r in rows)
    print(f"\n| {'measure'.ljust(width)} | value | target |\n|{'-' * (width + 2)}|-------|--------|")
    for name, value, target in rows:
        print(f"| {name.ljust(width)} | {value} | {target} |")
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"\nJSON: {args.out}")


if __name__ == "__main__":
    main()
