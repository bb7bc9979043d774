"""hpc_llama.eval's task side against lm-evaluation-harness itself: small task files and data written here are
read by lm-eval (offline) and by hpc_llama.eval, and the requests (context, continuation), the per-document
metrics and the aggregated values and stderrs must be identical. Then the bad inputs, each refused in one line
naming its file."""

import json
import os
import random

import pytest
import xxhash
import yaml

from hpc_llama.errors import HpcLlamaError
from hpc_llama.eval.data import read_split
from hpc_llama.eval.metrics import aggregate, doc_metrics
from hpc_llama.eval.tasks import DEFAULT_FEWSHOT_SEED, build_docs, fewshot_count, load_task, load_tasks

WORDS = ["alpha", "beta", "gamma", "délta", "日本語", "naïve", "x", "long-word", "zeta", "ωμέγα", "it's", "a,b"]


def fake_model(context, continuation):
    """A deterministic stand-in for a model: (loglik, is_greedy) from a hash of the request."""
    h = xxhash.xxh3_64_intdigest(f"{context}\0{continuation}".encode())
    return -(h % 1_000_000) / 100_000.0, bool(h >> 63)


def write(path, content):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(content if isinstance(content, bytes) else content.encode())
    return str(path)


def write_jsonl(path, rows):
    return write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def write_task(directory, config):
    return write(os.path.join(directory, config["task"] + ".yaml"), yaml.safe_dump(config, allow_unicode=True))


def phrase(rnd, n):
    return " ".join(rnd.choice(WORDS) for _ in range(n))


def mc_rows(rnd, n, prefix):
    return [{"topic": rnd.choice(WORDS), "question": f"{prefix} {i}: {phrase(rnd, 4)}?",
             "choices": [phrase(rnd, rnd.randint(1, 3)) for _ in range(4)], "label": rnd.randrange(4)}
            for i in range(n)]


def files(split_files):
    return {"data_files": split_files}


def build_suite(root):
    """The good tasks, one of each kind; returns their names."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rnd = random.Random(5)
    d = os.path.join(root, "data")
    # Multiple choice, choices from a field, gold an index, a description template, few-shot from train.
    write_jsonl(f"{d}/mc_index_test.jsonl", mc_rows(rnd, 9, "t"))
    write_jsonl(f"{d}/mc_index_train.jsonl", mc_rows(rnd, 7, "tr"))
    write_task(root, dict(
        task="mc_index", dataset_path="json", output_type="multiple_choice",
        dataset_kwargs=files({"test": "data/mc_index_test.jsonl", "train": "data/mc_index_train.jsonl"}),
        test_split="test", training_split="train", description="Questions about {{topic}}.\n\n",
        doc_to_text="Question: {{question}}\nAnswer:", doc_to_choice="choices", doc_to_target="label",
        metric_list=[{"metric": "acc"}, {"metric": "acc_norm"}, {"metric": "acc_bytes", "higher_is_better": True}],
        metadata={"version": 1.0}, tag=["demo"]))
    write_task(root, dict(  # the same, pinned to 0-shot by its file
        task="mc_pinned", dataset_path="json", output_type="multiple_choice",
        dataset_kwargs=files({"test": "data/mc_index_test.jsonl", "train": "data/mc_index_train.jsonl"}),
        test_split="test", training_split="train", num_fewshot=0,
        doc_to_text="Question: {{question}}\nAnswer:", doc_to_choice="choices", doc_to_target="label"))
    # Gold as a string, choices from a template, only a validation split (evaluated and few-shot source, so
    # lm-eval drops the document itself), and copies of one row (the sampler's draw-again path).
    rows = []
    for i in range(9):
        opts = [phrase(rnd, 2) + f" {i}{k}" for k in "abcd"]
        rows.append({"q": f"Pick {i}: {phrase(rnd, 3)}", "opt_a": opts[0], "opt_b": opts[1], "opt_c": opts[2],
                     "opt_d": opts[3], "answer": rnd.choice(opts)})
    rows[5:5] = [rows[2], rows[2], rows[2]]
    write_jsonl(f"{d}/mc_string_val.jsonl", rows)
    write_task(root, dict(
        task="mc_string", dataset_path="json", output_type="multiple_choice",
        dataset_kwargs=files({"validation": "data/mc_string_val.jsonl"}), validation_split="validation",
        doc_to_text="{{q}}", doc_to_choice="{{[opt_a, opt_b, opt_c, opt_d]}}", doc_to_target="answer"))
    # Fixed choices, a target template rendering digits (an index), doc_to_text a field, few-shot from the test
    # split itself named as fewshot_split, other delimiters, the task's own num_fewshot, a JSON array file.
    rows = [{"sentence": f"S{i}: {phrase(rnd, 5)}", "label": rnd.randrange(2)} for i in range(10)]
    write(f"{d}/mc_template.json", json.dumps(rows, indent=1))
    write_task(root, dict(
        task="mc_template", dataset_path="json", output_type="multiple_choice",
        dataset_kwargs=files({"test": "data/mc_template.json"}), test_split="test", fewshot_split="test",
        doc_to_text="sentence", doc_to_choice=["no", "yes"], doc_to_target="{{label}}",
        target_delimiter=" => ", fewshot_delimiter="\n---\n", num_fewshot=2))
    # Loglikelihood (lambada-like): the continuation is the last word, few-shot from two training files.
    texts = [{"text": phrase(rnd, rnd.randint(3, 8))} for _ in range(14)]
    write_jsonl(f"{d}/ll_test.jsonl", texts[:8])
    write_jsonl(f"{d}/ll_train_1.jsonl", texts[8:11])
    write_jsonl(f"{d}/ll_train_2.jsonl", texts[11:])
    write_task(root, dict(
        task="ll", dataset_path="json", output_type="loglikelihood",
        dataset_kwargs=files({"test": "data/ll_test.jsonl",
                              "train": ["data/ll_train_1.jsonl", "data/ll_train_2.jsonl"]}),
        test_split="test", training_split="train",
        doc_to_text="{{text.split(' ')[:-1]|join(' ')}}", doc_to_target="{{' '+text.split(' ')[-1]}}"))
    # CSV: quoting, a newline in a field, ints, floats with a missing value, NA strings, booleans.
    lines = ["question,a,b,c,label,score,note,flag"]
    plain = [w for w in WORDS if "," not in w]
    for i in range(8):
        q = f'"Q{i}, ""{rnd.choice(WORDS)}""\n{phrase(rnd, 2)}"' if i % 3 == 0 else f"Q{i} {rnd.choice(plain)}"
        score = "" if i == 4 else rnd.choice(["0.5", "1e3", "7", "-2.25"])
        note = rnd.choice(["NA", "", "None", "ok", "fine"])
        lines.append(f"{q},{rnd.choice(plain)}-a,{rnd.choice(plain)}-b,{rnd.choice(plain)}-c,{rnd.randrange(3)},"
                     f"{score},{note},{rnd.choice(['True', 'false', 'TRUE'])}")
    write(f"{d}/mc_csv_test.csv", "\n".join(lines[:6]) + "\n")
    write(f"{d}/mc_csv_train.csv", "\n".join(lines[:1] + lines[6:]) + "\n")
    write_task(root, dict(
        task="mc_csv", dataset_path="csv", output_type="multiple_choice",
        dataset_kwargs=files({"test": "data/mc_csv_test.csv", "train": "data/mc_csv_train.csv"}),
        test_split="test", training_split="train",
        doc_to_text="{{question}} (score {{score}}, {{note}}, {{flag}})", doc_to_choice="{{[a, b, c]}}",
        doc_to_target="label"))
    # Parquet, a list column of choices, few-shot from the validation split named as fewshot_split, the
    # description a field, lm-eval's regex_replace filter; acc_norm aggregated by median (bootstrapped stderr).
    for split, n in (("test", 8), ("validation", 6)):
        pq.write_table(pa.Table.from_pylist(mc_rows(rnd, n, split)), f"{d}/mc_parquet_{split}.parquet")
    write_task(root, dict(
        task="mc_parquet", dataset_path="parquet", output_type="multiple_choice",
        dataset_kwargs=files({"test": "data/mc_parquet_test.parquet",
                              "validation": "data/mc_parquet_validation.parquet"}),
        test_split="test", validation_split="validation", fewshot_split="validation", description="topic",
        doc_to_text="{{question|regex_replace('[0-9]+', '#')}}", doc_to_choice="choices", doc_to_target="label",
        metric_list=[{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                     {"metric": "acc_norm", "aggregation": "median"}]))
    # Rolling: whole texts, with runs of whitespace, non-ASCII, and one that looks like a list but is none.
    texts = [{"text": phrase(rnd, rnd.randint(5, 30)).replace(" x ", "  \n\t x ")} for _ in range(5)]
    texts.append({"text": "[citation needed] text [x]"})
    write_jsonl(f"{d}/rolling_test.jsonl", texts)
    write_task(root, dict(
        task="rolling", dataset_path="json", output_type="loglikelihood_rolling",
        dataset_kwargs=files({"test": "data/rolling_test.jsonl"}), test_split="test",
        doc_to_text="", doc_to_target="text"))
    return sorted(f[:-5] for f in os.listdir(root) if f.endswith(".yaml"))


CASES = ["ll", "mc_csv", "mc_index", "mc_parquet", "mc_pinned", "mc_string", "mc_template", "rolling"]


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("tasks"))
    assert build_suite(root) == CASES
    return root


@pytest.fixture(scope="module")
def lm(tmp_path_factory, suite):
    """lm-eval, imported once, offline, with its task objects for the suite (data paths are relative to the
    working directory there, so it reads them from the suite's directory)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_DATASETS_OFFLINE", "1")
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf_datasets")))
    mp.setenv("DISABLE_MULTIPROC", "1")  # lm-eval's bootstrap in this process: the same draws as its pool's
    lm_eval = pytest.importorskip("lm_eval")
    import lm_eval.evaluator
    import lm_eval.evaluator_utils
    from lm_eval.tasks import TaskManager

    # simple_evaluate's report of the environment (pip, torch, git) takes seconds and is no part of the check
    mp.setattr(lm_eval.evaluator, "add_env_info", lambda results: None)
    mp.setattr(lm_eval.evaluator, "get_git_commit_hash", lambda: None)
    mp.chdir(suite)
    manager = TaskManager(include_path=suite, include_defaults=False)
    loaded = manager.load(CASES)["tasks"]

    class Namespace:
        evaluator, evaluator_utils, tasks = lm_eval.evaluator, lm_eval.evaluator_utils, loaded
        task_manager = manager

    yield Namespace
    mp.undo()


def lm_eval_requests(task, shots, seed, limit):
    """lm-eval's requests per document: Instance.args in idx order, documents in order."""
    task.set_config(key="num_fewshot", value=shots)
    task.set_fewshot_seed(seed=seed)
    task.build_all_requests(limit=limit, rank=0, world_size=1)
    by_doc = {}
    for inst in task.instances:
        by_doc.setdefault(inst.doc_id, []).append(inst)
    return [[tuple(i.args) for i in sorted(insts, key=lambda i: i.idx)] for _, insts in sorted(by_doc.items())]


def ours(doc):
    return [(r.continuation,) if r.context is None else (r.context, r.continuation) for r in doc.requests]


@pytest.mark.parametrize("shots,seed,limit", [(0, DEFAULT_FEWSHOT_SEED, None), (3, DEFAULT_FEWSHOT_SEED, None),
                                              (3, 7, 5), (2, 11, None)])
@pytest.mark.parametrize("name", CASES)
def test_requests_are_lm_evals(lm, suite, name, shots, seed, limit):
    task = load_task(os.path.join(suite, name + ".yaml"))
    docs = build_docs(task, shots, seed, limit)
    effective = 0 if task.output_type == "loglikelihood_rolling" else fewshot_count(task, shots)
    expected = lm_eval_requests(lm.tasks[name], effective, seed, limit)
    assert [ours(d) for d in docs] == expected
    assert [d.index for d in docs] == list(range(len(expected)))
    assert all(d.prompt == (d.requests[0].context or "") for d in docs)


@pytest.mark.parametrize("name", CASES)
def test_documents_are_read_as_lm_eval_reads_them(lm, suite, name):
    # The values templates see: CSV types as pandas infers them, Parquet as Arrow gives them.
    task = load_task(os.path.join(suite, name + ".yaml"))
    assert [doc for doc, _ in read_split(task, task.eval_split)] == list(lm.tasks[name].eval_docs)


def strict(value):
    """A metric value with its type, so 1 and 1.0 (or a list and a tuple) do not pass for each other."""
    return (type(value).__name__, tuple(strict(v) for v in value) if isinstance(value, tuple) else value)


@pytest.mark.parametrize("bootstrap_iters,limit", [(100_000, None), (1500, None), (0, None), (100_000, 1)])
@pytest.mark.parametrize("name", CASES)
def test_metrics_are_lm_evals(lm, suite, name, bootstrap_iters, limit):
    task = load_task(os.path.join(suite, name + ".yaml"))
    reference = lm.tasks[name]
    docs = build_docs(task, 0, DEFAULT_FEWSHOT_SEED, limit)
    per_doc, raw = [], {}
    for doc, lm_doc in zip(docs, reference.eval_docs):
        results = [fake_model(r.context, r.continuation) for r in doc.requests]
        mine = doc_metrics(task, doc, results)
        if task.output_type == "loglikelihood_rolling":
            theirs = reference.process_results(lm_doc, [ll for ll, _ in results])
        else:
            theirs = reference.process_results(lm_doc, results)
        assert {k: strict(v) for k, v in mine["metrics"].items()} == {k: strict(v) for k, v in theirs.items()}
        per_doc.append(mine)
        for metric, value in theirs.items():
            raw.setdefault((metric, "none"), []).append(value)
    expected, _ = lm.evaluator_utils._compute_task_aggregations(reference, raw, bootstrap_iters)
    got = aggregate(task, per_doc, bootstrap_iters=bootstrap_iters)
    assert sorted(got) == sorted(metric for metric, _ in raw)
    for metric, result in got.items():
        assert result["value"] == pytest.approx(expected[f"{metric},none"], rel=1e-12, abs=1e-12)
        stderr = expected[f"{metric}_stderr,none"]
        assert result["stderr"] == (None if stderr == "N/A" else pytest.approx(stderr, rel=1e-12, abs=1e-12))
    if bootstrap_iters and limit is None and task.output_type != "loglikelihood_rolling":
        assert all(r["stderr"] is not None for r in got.values())


@pytest.mark.parametrize("num_fewshot", [None, 3])
def test_simple_evaluate_end_to_end(lm, suite, num_fewshot):
    # lm-eval's own entry point: its num_fewshot override rule, its fewshot seed, its aggregation and stderr.
    from lm_eval.api.model import LM

    class Model(LM):
        def loglikelihood(self, requests):
            return [fake_model(*r.args) for r in requests]

        def loglikelihood_rolling(self, requests):
            return [fake_model(None, r.args[0])[0] for r in requests]

        def generate_until(self, requests):
            raise NotImplementedError

    seed = 99
    run = lm.evaluator.simple_evaluate(
        model=Model(), tasks=CASES, num_fewshot=num_fewshot, task_manager=lm.task_manager, bootstrap_iters=5000,
        fewshot_random_seed=seed, random_seed=None, numpy_random_seed=None, torch_random_seed=None, log_samples=True)
    for task in load_tasks([suite]):
        if task.output_type != "loglikelihood_rolling":
            assert fewshot_count(task, num_fewshot) == run["n-shot"][task.name]
        docs = build_docs(task, num_fewshot, seed)
        samples = sorted(run["samples"][task.name], key=lambda s: s["doc_id"])
        assert [ours(d) for d in docs] == [[tuple(a) for a in s["arguments"]] for s in samples]
        per_doc = [doc_metrics(task, d, [fake_model(r.context, r.continuation) for r in d.requests]) for d in docs]
        for metric, result in aggregate(task, per_doc, bootstrap_iters=5000).items():
            theirs = run["results"][task.name]
            assert result["value"] == pytest.approx(theirs[f"{metric},none"], rel=1e-12, abs=1e-12)
            stderr = theirs[f"{metric}_stderr,none"]
            assert result["stderr"] == (None if stderr == "N/A" else pytest.approx(stderr, rel=1e-12, abs=1e-12))


# --- loading ------------------------------------------------------------------------------------------------


def test_load_tasks_reads_a_directory_sorted_and_not_recursively(suite, tmp_path):
    tasks = load_tasks([suite])
    assert [t.name for t in tasks] == sorted(CASES)
    first = tasks[0]
    with open(first.path, "rb") as f:
        assert first.checksum == xxhash.xxh3_64_hexdigest(f.read())
    index = next(t for t in tasks if t.name == "mc_index")
    assert index.metric_list[2].name == "acc_bytes" and index.version == 1.0 and index.tag == ("demo",)
    assert isinstance(next(t for t in tasks if t.name == "mc_template").doc_to_choice, tuple)
    # a .yml file, a file given by name, and a subdirectory that is not read
    other = tmp_path / "other"
    write(str(other / "data" / "t.jsonl"), '{"text": "a b"}\n')
    write(str(other / "one.yml"), yaml.safe_dump(dict(
        task="one", dataset_path="json", dataset_kwargs=files({"test": "data/t.jsonl"}), test_split="test",
        output_type="loglikelihood_rolling", doc_to_target="text")))
    write(str(other / "nested" / "two.yaml"), "task: two\n")
    assert [t.name for t in load_tasks([str(other)])] == ["one"]
    assert [t.name for t in load_tasks([str(other / "one.yml"), os.path.join(suite, "ll.yaml")])] == ["one", "ll"]


def test_limit_takes_the_first_documents_and_the_same_examples(suite):
    task = load_task(os.path.join(suite, "mc_index.yaml"))
    assert build_docs(task, 3, 5, limit=4) == build_docs(task, 3, 5)[:4]


# --- bad input: one line, naming the file ---------------------------------------------------------------------

BASE = dict(task="bad", dataset_path="json", output_type="multiple_choice",
            dataset_kwargs=files({"test": "test.jsonl", "train": "train.jsonl"}), test_split="test",
            training_split="train", doc_to_text="{{question}}", doc_to_choice="choices", doc_to_target="label")
ROWS = [{"question": f"q{i}", "choices": ["a", "b", "c"], "label": i % 3, "answer": "b"} for i in range(3)]


def drop(key):
    return {k: v for k, v in BASE.items() if k != key}


def with_rows(changes=None):
    """ROWS as JSON lines, with changes {row index: {field: new value, or None to remove the field}}."""
    rows = [dict(r) for r in ROWS]
    for i, change in (changes or {}).items():
        for k, v in change.items():
            if v is None:
                del rows[i][k]
            else:
                rows[i][k] = v
    return "".join(json.dumps(r) + "\n" for r in rows)


# (id, task file: a mapping or raw text, {data file: text}, what is called, where, what the message says)
BAD = [
    ("unknown-key", {**BASE, "generation_kwargs": {"until": ["\n"]}}, {}, "load", "bad.yaml:",
     "unknown task key 'generation_kwargs'"),
    ("not-a-mapping", "- task: bad\n", {}, "load", "bad.yaml", "a task file is a mapping"),
    ("empty-file", "", {}, "load", "bad.yaml", "this one is empty"),
    ("invalid-yaml", "task: [bad\n", {}, "load", "bad.yaml:", "not valid YAML"),
    ("python-function", {**BASE, "doc_to_text": "!F"}, {}, "load", "bad.yaml:", "!function"),
    ("template-names-missing-field", {**BASE, "doc_to_text": "Q: {{nope}}"}, {}, "build", "test.jsonl:1",
     "template doc_to_text names a field 'nope' the document does not have"),
    ("field-missing-in-one-document", BASE, {"test.jsonl": with_rows({1: {"question": None}})}, "build",
     "test.jsonl:2", "doc_to_text names a field 'question' the document does not have"),
    ("gold-index-out-of-range", BASE, {"test.jsonl": with_rows({2: {"label": 3}})}, "build", "test.jsonl:3",
     "gold index 3 is out of range for 3 choices"),
    ("gold-string-not-a-choice", {**BASE, "doc_to_target": "answer"},
     {"test.jsonl": with_rows({1: {"answer": "zz"}})}, "build", "test.jsonl:2", "'zz' is not among the choices"),
    ("gold-neither-index-nor-text", BASE, {"test.jsonl": with_rows({0: {"label": 1.5}})}, "build", "test.jsonl:1",
     "neither a choice index nor a choice"),
    ("several-targets", {**BASE, "doc_to_target": "{{[label]}}"}, {}, "build", "test.jsonl:1",
     "several gold targets"),
    ("empty-choice-list", BASE, {"test.jsonl": with_rows({1: {"choices": []}})}, "build", "test.jsonl:2",
     "the choice list is empty"),
    ("empty-choice", BASE, {"test.jsonl": with_rows({0: {"choices": ["a", ""]}})}, "build", "test.jsonl:1",
     "choice 1 is empty"),
    ("empty-fixed-choice-list", {**BASE, "doc_to_choice": []}, {}, "load", "bad.yaml:", "the choice list is empty"),
    ("choices-not-a-list", {**BASE, "doc_to_choice": "{{question}}"}, {}, "build", "test.jsonl:1",
     "not a Python list literal"),
    ("missing-data-file", {**BASE, "dataset_kwargs": files({"test": "nothere.jsonl"})}, {}, "load", "bad.yaml:",
     "nothere.jsonl (split test) does not exist"),
    ("empty-split", BASE, {"test.jsonl": "\n\n"}, "build", "test.jsonl", "split 'test' of task bad holds no documents"),
    ("path-escapes", {**BASE, "dataset_kwargs": files({"test": "../outside.jsonl"})}, {}, "load", "bad.yaml:",
     "lies outside the task file's directory"),
    ("link-escapes", {**BASE, "dataset_kwargs": files({"test": "link.jsonl"})}, {}, "load", "bad.yaml:",
     "lies outside the task file's directory"),
    ("absolute-path-escapes", {**BASE, "dataset_kwargs": files({"test": "/etc/hostname"})}, {}, "load", "bad.yaml:",
     "lies outside the task file's directory"),
    ("split-without-files", {**BASE, "validation_split": "validation"}, {}, "load", "bad.yaml:",
     "validation_split 'validation' has no files"),
    ("nothing-to-evaluate", drop("test_split"), {}, "load", "bad.yaml", "neither test_split nor validation_split"),
    ("fewshot-more-than-pool", BASE, {}, "build5", "bad.yaml", "5 few-shot examples need 5 documents in split "
     "'train', which holds 3"),
    ("fewshot-more-than-pool-less-self", {**drop("training_split"), "fewshot_split": "test"}, {}, "build3",
     "bad.yaml", "need 4 documents in split 'test', which holds 3 (lm-eval draws one more"),
    ("unknown-metric", {**BASE, "metric_list": [{"metric": "acc"}, {"metric": "perplexity"}]}, {}, "load",
     "bad.yaml:", "metric 'perplexity' is not one of multiple_choice's"),
    ("metric-option", {**BASE, "metric_list": [{"metric": "acc", "ignore_case": True}]}, {}, "load", "bad.yaml:",
     "key 'ignore_case' is not supported"),
    ("bad-aggregation", {**BASE, "metric_list": [{"metric": "acc", "aggregation": "bits_per_byte"}]}, {}, "load",
     "bad.yaml:", "aggregation 'bits_per_byte' is not one of"),
    ("dataset-name", {**BASE, "dataset_name": "main"}, {}, "load", "bad.yaml:", "dataset_name"),
    ("decontamination", {**BASE, "should_decontaminate": True}, {}, "load", "bad.yaml:",
     "decontamination is not supported"),
    ("hub-loader", {**BASE, "dataset_path": "cais/mmlu"}, {}, "load", "bad.yaml:", "only local files are read"),
    ("hub-dataset", {**BASE, "dataset_path": "cais/mmlu"}, {}, "load", "bad.yaml:", "only local files"),
    ("generate-until", {**BASE, "output_type": "generate_until"}, {}, "load", "bad.yaml:",
     "output_type 'generate_until' is not run here"),
    ("no-output-type", drop("output_type"), {}, "load", "bad.yaml", "output_type is missing"),
    ("multiple-input", {**BASE, "doc_to_text": 0}, {}, "load", "bad.yaml:", "multiple-input"),
    ("template-syntax", {**BASE, "doc_to_text": "{{ question "}, {}, "load", "bad.yaml:",
     "doc_to_text is not a valid Jinja template"),
    ("template-too-big", {**BASE, "doc_to_text": "{{ question * 100000000 }}"}, {}, "build", "test.jsonl:1",
     "template doc_to_text was stopped"),
    ("invalid-json-line", BASE, {"test.jsonl": with_rows() + "{oops\n"}, "build", "test.jsonl:4", "invalid JSON"),
    ("not-an-object", BASE, {"test.jsonl": "[1, 2]\n"}, "build", "test.jsonl row 1", "expected a JSON object"),
    ("wrong-type", {**BASE, "num_fewshot": "three"}, {}, "load", "bad.yaml:", "num_fewshot must be a number"),
    ("empty-target", {**drop("doc_to_choice"), "output_type": "loglikelihood", "doc_to_target": "{{''}}"}, {},
     "build", "test.jsonl:1", "the target is empty"),
    ("limit-zero", BASE, {}, "limit0", "limit", "limit must be at least 1"),
    ("duplicate-task", BASE, {}, "twice", "bad.yaml", "task 'bad' is defined in"),
]


@pytest.mark.parametrize("config,data,call,where,says", [case[1:] for case in BAD], ids=[case[0] for case in BAD])
def test_bad_input_is_one_line_naming_the_file(tmp_path, config, data, call, where, says):
    directory = tmp_path / "task"
    contents = {"test.jsonl": with_rows(), "train.jsonl": with_rows(), **data}
    for name, text in contents.items():
        write(str(directory / name), text)
    write(str(tmp_path / "outside.jsonl"), with_rows())
    os.symlink(tmp_path / "outside.jsonl", directory / "link.jsonl")
    text = config if isinstance(config, str) else yaml.safe_dump(config).replace("'!F'", "!function utils.f")
    path = write(str(directory / "bad.yaml"), text)
    with pytest.raises(HpcLlamaError) as e:
        if call == "load":
            load_task(path)
        elif call == "twice":
            write(str(directory / "copy.yaml"), text)
            load_tasks([str(directory)])
        elif call == "limit0":
            build_docs(load_task(path), 0, limit=0)
        else:
            build_docs(load_task(path), int(call[5:]) if call[5:] else 0)
    message = str(e.value)
    assert "\n" not in message and says in message and where in message, message
