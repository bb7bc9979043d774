"""Evaluation tasks for `hpc-llama eval`: lm-evaluation-harness task YAML files (the subset in
docs/eval-tasks.md) read into frozen Tasks, and each document turned into the log-likelihood requests that
lm-eval 0.4.13 sends for it, character for character: the same prompt, the same few-shot examples drawn from
the same random stream, the same continuations. Pure: no MPI, no torch.

Each rule below says which lm-eval code it follows; lm_eval/api/task.py's ConfigurableTask is meant where
no file is named.
"""

from __future__ import annotations

import ast
import os
import random
import re
from dataclasses import dataclass
from typing import Any

import xxhash
import yaml
from jinja2 import StrictUndefined
from jinja2.exceptions import TemplateError, UndefinedError

from ..chat import BoundedSandbox, Limit
from ..errors import HpcLlamaError
from . import DEFAULT_FEWSHOT_SEED
from .data import read_split, read_utf8, said
from .metrics import DEFAULT_METRICS, METRICS, PAIR_AGGREGATIONS, PAIR_METRICS, SCALAR_AGGREGATIONS

OUTPUT_TYPES = tuple(METRICS)
"""The output types run: the log-likelihood ones (lm-eval's generate_until is not)."""
# json reads JSON lines and JSON array files alike (as lm-eval's loader); jsonl is a name for the same reader
# here (lm-eval itself knows only json).
FORMATS = ("json", "jsonl", "parquet", "csv")
"""dataset_path values read: the names of lm-eval's (Hugging Face datasets') loaders for local files."""
TEMPLATE_SECONDS = 5.0
"""Longest one rendering of a task's Jinja template may take."""
TEMPLATE_CHARS = 1 << 20
"""Size bound of one rendering (see chat.BoundedSandbox), raised to 8 times the document's size."""

KEYS = ("task", "dataset_path", "dataset_kwargs", "test_split", "validation_split", "training_split",
        "fewshot_split", "output_type", "doc_to_text", "doc_to_choice", "doc_to_target", "target_delimiter",
        "fewshot_delimiter", "num_fewshot", "description", "metric_list", "tag", "metadata", "dataset_name",
        "should_decontaminate", "doc_to_decontamination_query")
SPLIT_KEYS = ("test_split", "validation_split", "training_split", "fewshot_split")
TEMPLATE_KEYS = ("doc_to_text", "doc_to_choice", "doc_to_target", "description")


@dataclass(frozen=True)
class Metric:
    """One metric of a task (an entry of metric_list, or one of lm-eval's defaults for the output type)."""

    name: str
    """acc, acc_norm, perplexity, ... (metrics.METRICS)."""
    aggregation: str
    """How per-document values become the task's value: mean, median, perplexity, weighted_perplexity, bits_per_byte."""
    higher_is_better: bool
    """As the task file says, else lm-eval's registry."""


@dataclass(frozen=True)
class Task:
    """One task file, checked: every key it may hold is a field here."""

    name: str
    """The `task:` key."""
    path: str
    """The YAML file."""
    checksum: str
    """xxh3_64 hexdigest of the YAML file's bytes."""
    output_type: str
    """multiple_choice, loglikelihood or loglikelihood_rolling."""
    dataset_path: str
    """Format of the data files, by lm-eval's loader name: json (JSON lines or a JSON array), parquet or csv."""
    data_files: tuple[tuple[str, tuple[str, ...]], ...]
    """(split, its files in order) from dataset_kwargs.data_files, each resolved inside the YAML's directory."""
    test_split: str | None = None
    """Split evaluated when set."""
    validation_split: str | None = None
    """Split evaluated when there is no test_split."""
    training_split: str | None = None
    """Few-shot source when there is no fewshot_split."""
    fewshot_split: str | None = None
    """Few-shot source first of all."""
    doc_to_text: str | None = None
    """The question: a field name or a Jinja template (None only for loglikelihood_rolling)."""
    doc_to_choice: str | tuple[str, ...] | None = None
    """The choices (multiple_choice): a field name, a template rendering a Python list literal, or a fixed list."""
    doc_to_target: str | int | None = None
    """The gold choice (index or text), the continuation, or the rolling text: a field name, a template, or an index."""
    target_delimiter: str = " "
    """Between question and answer (and before each choice)."""
    fewshot_delimiter: str = "\n\n"
    """After each few-shot example."""
    num_fewshot: int | None = None
    """The task's own few-shot count; None when the file does not say."""
    description: str = ""
    """Text (a field name or a template) put before the few-shot examples, without a delimiter."""
    metric_list: tuple[Metric, ...] = ()
    """The metrics reported, in order."""
    tag: tuple[str, ...] = ()
    """lm-eval's tags; no meaning here."""
    metadata: tuple[tuple[str, Any], ...] = ()
    """lm-eval's metadata as (key, value) pairs (mappings and lists frozen to tuples); no meaning here."""

    @property
    def eval_split(self) -> str:
        """The split evaluated: test_split if set, else validation_split (lm-eval's Task.eval_docs)."""
        return self.test_split if self.test_split is not None else self.validation_split

    @property
    def fewshot_source(self) -> str | None:
        """The split few-shot examples come from: fewshot_split, else training_split, else validation_split
        (ConfigurableTask.fewshot_docs, then Task.fewshot_docs); None when the task names none of them
        (lm-eval then draws from the test split itself, and so does build_docs)."""
        for split in (self.fewshot_split, self.training_split, self.validation_split):
            if split is not None:
                return split
        return None

    @property
    def version(self):
        """metadata's version, which lm-eval reports as the task's version (None without one)."""
        return dict(self.metadata).get("version")

    def files(self, split: str) -> tuple[str, ...]:
        return dict(self.data_files)[split]


@dataclass(frozen=True)
class Request:
    """One log-likelihood request: the model scores `continuation` after `context`."""

    context: str | None
    """None for loglikelihood_rolling."""
    continuation: str
    """For loglikelihood_rolling: the whole text scored."""


@dataclass(frozen=True)
class EvalDoc:
    """One document of a task's evaluation split, ready for the model."""

    task: str
    """The task's name."""
    index: int
    """The document's index in its evaluation split."""
    where: str
    """FILE:LINE (JSON lines) or FILE row N (JSON array, Parquet, CSV; N from 1) for error messages."""
    prompt: str
    """The full context: description + few-shot examples + the question; "" for loglikelihood_rolling."""
    requests: tuple[Request, ...]
    """One per choice (multiple_choice), one otherwise."""
    choices: tuple[str, ...] | None
    """The choices, without the target delimiter (multiple_choice)."""
    gold: int | str | None
    """The gold choice's index (multiple_choice), the target text (loglikelihood), None (rolling)."""
    word_count: int | None = None
    """loglikelihood_rolling: the text's words, as lm-eval counts them (len(re.split(r"\\s+", text)))."""
    byte_count: int | None = None
    """loglikelihood_rolling: the text's UTF-8 bytes."""


def load_tasks(specs: list[str]) -> list[Task]:
    """The tasks of each spec in order: a .yaml/.yml file, or a directory's *.yaml/*.yml files sorted by name
    (not recursive). Two tasks of one name are an error."""
    tasks, seen = [], {}
    for spec in specs:
        if os.path.isdir(spec):
            paths = sorted(os.path.join(spec, f) for f in os.listdir(spec)
                           if f.endswith((".yaml", ".yml")) and os.path.isfile(os.path.join(spec, f)))
            if not paths:
                raise HpcLlamaError(f"{spec}: the directory holds no .yaml or .yml task files")
        elif os.path.exists(spec):
            if not spec.endswith((".yaml", ".yml")):
                raise HpcLlamaError(f"{spec}: a task file is a .yaml or .yml file")
            paths = [spec]
        else:
            raise HpcLlamaError(f"{spec}: no such file or directory")
        for path in paths:
            task = load_task(path)
            if task.name in seen:
                raise HpcLlamaError(f"{path}: task {task.name!r} is defined in {seen[task.name]} too")
            seen[task.name] = path
            tasks.append(task)
    return tasks


def load_task(path: str) -> Task:
    """One task file, checked: an unknown key, a value of the wrong kind, a template that does not parse or a
    data file that is missing (or lies outside the file's directory) is a one-line error naming the file."""
    raw, text = read_utf8(path)
    config, lines = _read_yaml(path, text)
    return _TaskFile(path, config, lines).task(xxhash.xxh3_64_hexdigest(raw))


def fewshot_count(task: Task, num_fewshot: int | None) -> int:
    """The few-shot examples per document: num_fewshot, or the task's own when None (0 when it has none).
    As lm-eval's simple_evaluate does, a task whose file says `num_fewshot: 0` keeps 0 whatever is asked."""
    if num_fewshot is not None and num_fewshot < 0:
        raise HpcLlamaError(f"num_fewshot must be at least 0, got {num_fewshot}")
    if num_fewshot is None or task.num_fewshot == 0:
        return task.num_fewshot or 0
    return num_fewshot


def build_docs(task: Task, num_fewshot: int | None, seed: int = DEFAULT_FEWSHOT_SEED,
               limit: int | None = None) -> list[EvalDoc]:
    """The evaluation split's documents (the first `limit` of them) with their requests, as lm-eval builds
    them with `--num_fewshot num_fewshot --seed _,_,_,seed --limit limit`; `seed` plays lm-eval's fewshot
    seed. loglikelihood_rolling tasks take no few-shot examples (lm-eval builds a context and drops it)."""
    if limit is not None and limit < 1:
        raise HpcLlamaError(f"limit must be at least 1, got {limit}")
    shots = fewshot_count(task, num_fewshot)
    docs = read_split(task, task.eval_split)
    # lm-eval decides "field name or template" by the evaluation split's columns (self.features).
    render = _Render(task, frozenset(k for doc, _ in docs for k in doc))
    selected = docs if limit is None else docs[:limit]
    if task.output_type == "loglikelihood_rolling":
        return [render.rolling(index, doc, where) for index, (doc, where) in enumerate(selected)]

    pool, drop_self = [], False
    if shots:
        # lm-eval falls back to the test split itself (with a warning) when no other split is named; so does
        # this, for the same prompts. Its drop rule below then keeps the document out of its own examples
        # only when fewshot_split is unset and test_split too: docs/eval-tasks.md says what that means.
        source = task.fewshot_source or task.eval_split
        pool = docs if source == task.eval_split else read_split(task, source)
        # ConfigurableTask.fewshot_context hands the sampler the evaluated document to drop exactly when
        # fewshot_split equals test_split, as written: both unset counts too (then the sampler draws one more
        # and drops the document even when the examples come from training_split), and a fewshot_split
        # naming the validation split evaluated does not.
        drop_self = task.fewshot_split == task.test_split
        need = shots + 1 if drop_self else shots
        if len(pool) < need:
            raise HpcLlamaError(f"{task.path}: {shots} few-shot examples need {need} documents in split {source!r}, "
                                f"which holds {len(pool)}"
                                + (" (lm-eval draws one more and drops the document evaluated)" if drop_self else ""))
    # lm-eval: one random.Random(fewshot seed) per task (set_fewshot_seed), drawn from document by document
    # in order, only for documents that take examples.
    rnd = random.Random(seed)
    out = []
    for index, (doc, where) in enumerate(selected):
        picks = _sample(rnd, pool, shots, doc if drop_self else None, task, where) if shots else []
        prompt = render.description(doc, where) + "".join(render.example(*pool[i]) for i in picks) \
            + render.text(doc, where)
        out.append(render.eval_doc(index, doc, where, prompt))
    return out


def _sample(rnd: random.Random, pool: list, n: int, eval_doc: dict | None, task: Task, where: str) -> list[int]:
    """Indices into pool of the few-shot examples of one document: lm-eval's ContextSampler.sample (the
    "default" sampler). It draws rnd.sample(pool, n); or, given the evaluated document, rnd.sample(pool, n + 1),
    drops every document equal to it and keeps the first n; if copies of it left fewer than n, it draws again,
    rnd.sample(pool without the copies, n). random.sample picks the same positions from a range as from a
    list of the same length, so positions are drawn here."""
    if eval_doc:  # `if not eval_doc` there: an empty document is not dropped
        picks = [i for i in rnd.sample(range(len(pool)), n + 1) if pool[i][0] != eval_doc][:n]
        if len(picks) < n:
            rest = [i for i in range(len(pool)) if pool[i][0] != eval_doc]
            if len(rest) < n:
                raise HpcLlamaError(f"{where}: the few-shot split holds only {len(rest)} documents other than this "
                                    f"one (task {task.name}), fewer than the {n} few-shot examples asked for")
            picks = [rest[j] for j in rnd.sample(range(len(rest)), n)]
        return picks
    return rnd.sample(range(len(pool)), n)


def _regex_replace(string, pattern, repl, count: int = 0):
    # lm_eval/utils.py's one custom filter
    return re.sub(pattern, repl, string, count=count)


def _size(v) -> int:
    """Characters in v's strings and items in its lists and mappings (a document's size, for the sandbox)."""
    total, stack = 0, [v]
    while stack:
        x = stack.pop()
        if isinstance(x, str):
            total += len(x)
        elif isinstance(x, (list, tuple)):
            total += len(x)
            stack.extend(x)
        elif isinstance(x, dict):
            total += len(x)
            stack.extend(x.values())
        else:
            total += 1
    return total


def _sandbox() -> BoundedSandbox:
    # lm_eval/utils.py renders with Environment(undefined=StrictUndefined, keep_trailing_newline=True) and a
    # regex_replace filter; the same here, bounded in time and size.
    env = BoundedSandbox(TEMPLATE_SECONDS, TEMPLATE_CHARS, undefined=StrictUndefined, keep_trailing_newline=True)
    env.filters["regex_replace"] = env._bounded("regex_replace", _regex_replace)  # under the sandbox's checks
    return env


class _Render:
    """The doc_to_* rules of one task over one evaluation split's columns."""

    def __init__(self, task: Task, features: frozenset):
        self.task, self.features = task, features
        self.env = _sandbox()
        self.compiled = {}
        self.examples = {}  # id(few-shot doc) -> its text: the same documents come back again and again

    def fail(self, where: str, what: str):
        raise HpcLlamaError(f"{where}: {what} (task {self.task.name})")

    def render(self, key: str, source: str, doc: dict, where: str) -> str:
        template = self.compiled.get(source)
        if template is None:
            template = self.compiled[source] = self.env.compile_bounded(source)  # parsed once at load already
        self.env.start(_size(doc))
        try:
            return template.render(**doc)
        except UndefinedError as e:
            name = re.fullmatch(r"'(.*)' is undefined", str(e))
            self.fail(where, f"template {key} names a field {name.group(1)!r} the document does not have" if name
                      else f"template {key} failed: {said(e)}")
        except Limit as e:
            self.fail(where, f"template {key} was stopped: {said(e)}")
        except TemplateError as e:
            self.fail(where, f"template {key} failed: {said(e)}")
        except (Exception, RecursionError, MemoryError) as e:  # a template can raise anything its values do
            self.fail(where, f"template {key} failed: {type(e).__name__}: {said(e)}")
        finally:
            self.env.stop()

    def field(self, key: str, name: str, doc: dict, where: str):
        if name not in doc:
            self.fail(where, f"{key} names a field {name!r} the document does not have")
        return doc[name]

    def text(self, doc: dict, where: str) -> str:
        # doc_to_text: a column's value, else the rendered template; a rendering of digits becomes an int
        # when the task has choices (lm-eval's multiple-input form, not run here).
        source = self.task.doc_to_text
        if source in self.features:
            value = self.field("doc_to_text", source, doc, where)
        else:
            value = self.render("doc_to_text", source, doc, where)
            if value.isdigit() and self.task.doc_to_choice is not None:
                self.fail(where, f"doc_to_text renders {value!r}, which lm-eval turns into a number: its "
                                 "multiple-input form (one context per choice) is not supported")
        if not isinstance(value, str):
            self.fail(where, f"doc_to_text gives {type(value).__name__} {_short(value)}, not text"
                      + (" (lm-eval's multiple-input form is not supported)" if isinstance(value, int) else ""))
        return value

    def target(self, doc: dict, where: str):
        # doc_to_target: an int is the index itself; a column's value as it is; a rendered template becomes an
        # int when it is all digits and the task has choices, and a list when it looks like one.
        source = self.task.doc_to_target
        if isinstance(source, int):
            return source
        if source in self.features:
            value = self.field("doc_to_target", source, doc, where)
        else:
            value = self.render("doc_to_target", source, doc, where)
            if value.isdigit() and self.task.doc_to_choice is not None:
                try:
                    return ast.literal_eval(value)
                except (SyntaxError, ValueError):
                    self.fail(where, f"doc_to_target renders {_short(value)}, which lm-eval reads as a number "
                                     "and cannot (ast.literal_eval)")
            if len(value) >= 2 and value[0] == "[" and value[-1] == "]":
                try:
                    value = ast.literal_eval(value)
                except (SyntaxError, ValueError, TypeError, MemoryError, RecursionError):
                    pass
        if isinstance(value, (list, tuple)):
            self.fail(where, f"doc_to_target gives a list {_short(value)}: several gold targets per document "
                             "are not supported")
        return value

    def choices(self, doc: dict, where: str) -> tuple[str, ...]:
        # doc_to_choice: a fixed list; a column's value; else the template's rendering read by ast.literal_eval.
        source = self.task.doc_to_choice
        if isinstance(source, tuple):
            value = source
        elif source in self.features:
            value = self.field("doc_to_choice", source, doc, where)
        else:
            rendered = self.render("doc_to_choice", source, doc, where)
            try:
                value = ast.literal_eval(rendered)
            except (SyntaxError, ValueError, TypeError, MemoryError, RecursionError):
                self.fail(where, f"doc_to_choice renders {_short(rendered)}, not a Python list literal "
                                 "(lm-eval reads it with ast.literal_eval)")
        if not isinstance(value, (list, tuple)) or not all(isinstance(c, str) for c in value):
            self.fail(where, f"doc_to_choice gives {_short(value)}, not a list of strings")
        if not value:
            self.fail(where, "the choice list is empty")
        if "" in value:
            self.fail(where, f"choice {value.index('')} is empty (lm-eval fails on it)")
        return tuple(value)

    def description(self, doc: dict, where: str) -> str:
        # Task.resolve_field: a key of this document, else a template; no delimiter after it (it is the
        # system message, whose plain-text delimiter is "").
        source = self.task.description
        if not source:
            return ""
        value = doc[source] if source in doc else self.render("description", source, doc, where)
        if value is not None and not isinstance(value, str):
            self.fail(where, f"description gives {type(value).__name__} {_short(value)}, not text")
        return value or ""

    def example(self, doc: dict, where: str) -> str:
        # ConfigurableTask.build_qa_turn as plain text: question + target delimiter + answer + few-shot
        # delimiter, the answer being choices[target] for an int target and the target itself otherwise; a
        # target that is None or "" gives the question alone, without either delimiter.
        text = self.examples.get(id(doc))
        if text is not None:
            return text
        q = self.text(doc, where)
        a = self.target(doc, where)
        if a is None or a == "":
            text = q
        else:
            c = self.choices(doc, where) if self.task.doc_to_choice is not None else None
            if c and isinstance(a, int):
                if not -len(c) <= a < len(c):
                    self.fail(where, f"the gold index {a} of this few-shot example is out of range for its "
                                     f"{len(c)} choices")
                a = c[a]
            if not isinstance(a, str):
                self.fail(where, f"the target of this few-shot example is {type(a).__name__} {_short(a)}, not text")
            text = q + self.task.target_delimiter + a + self.task.fewshot_delimiter
        self.examples[id(doc)] = text
        return text

    def eval_doc(self, index: int, doc: dict, where: str, prompt: str) -> EvalDoc:
        task = self.task
        if task.output_type == "loglikelihood":
            # construct_requests: (context, doc_to_target) as it is: no target delimiter is put in between
            target = self.target(doc, where)
            if not isinstance(target, str):
                self.fail(where, f"the target is {type(target).__name__} {_short(target)}, not text")
            if not target:
                self.fail(where, "the target is empty: there is nothing to score")
            return EvalDoc(task.name, index, where, prompt, (Request(prompt, target),), None, target)
        choices = self.choices(doc, where)
        gold = self.target(doc, where)
        # process_results: an int is the gold index, a string the first choice equal to it.
        if isinstance(gold, int):
            if not 0 <= gold < len(choices):
                self.fail(where, f"the gold index {gold} is out of range for {len(choices)} choices")
            gold = int(gold)
        elif isinstance(gold, str):
            if gold not in choices:
                self.fail(where, f"the gold answer {_short(gold)} is not among the choices {_short(list(choices))}")
            gold = choices.index(gold)
        else:
            self.fail(where, f"the gold answer is {type(gold).__name__} {_short(gold)}, neither a choice index "
                             "nor a choice")
        requests = tuple(Request(prompt, task.target_delimiter + c) for c in choices)
        return EvalDoc(task.name, index, where, prompt, requests, choices, gold)

    def rolling(self, index: int, doc: dict, where: str) -> EvalDoc:
        text = self.target(doc, where)
        if not isinstance(text, str):
            self.fail(where, f"the text to score is {type(text).__name__} {_short(text)}, not text")
        if not text:
            self.fail(where, "the text to score is empty")
        # Task.count_words and count_bytes
        return EvalDoc(self.task.name, index, where, "", (Request(None, text),), None, None,
                       word_count=len(re.split(r"\s+", text)), byte_count=len(text.encode("utf-8")))


def _short(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


# ---------------------------------------------------------------------------------------------- task files

def _read_yaml(path: str, text: str) -> tuple[dict, dict[str, int]]:
    """The file's mapping and the line of each top-level key."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)(text)
    try:
        node = loader.get_single_node()
        if not isinstance(node, yaml.MappingNode):
            kind = "empty" if node is None else "a list" if isinstance(node, yaml.SequenceNode) else "a single value"
            raise HpcLlamaError(f"{path}: a task file is a mapping of task keys, this one is {kind}")
        lines = {}
        for key, _ in node.value:
            if isinstance(key, yaml.ScalarNode):
                lines.setdefault(key.value, key.start_mark.line + 1)
        config = loader.construct_document(node)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else path
        if "!function" in str(getattr(e, "problem", "")):
            raise HpcLlamaError(f"{where}: !function (Python code in the task) is not supported") from None
        raise HpcLlamaError(f"{where}: not valid YAML: {said(getattr(e, 'problem', None) or e)}") from None
    except RecursionError:
        raise HpcLlamaError(f"{path}: the YAML nests too deeply") from None
    finally:
        loader.dispose()
    return config, lines


class _TaskFile:
    """Reads a task file's mapping into a Task, each problem one line naming the file and the key's line."""

    def __init__(self, path: str, config: dict, lines: dict[str, int]):
        self.path, self.config, self.lines = path, config, lines

    def fail(self, key, what: str):
        line = self.lines.get(key) if isinstance(key, str) else None
        raise HpcLlamaError(f"{self.path}:{line}: {what}" if line else f"{self.path}: {what}")

    def get(self, key: str, kinds: tuple, what: str, default=None, required: bool = False):
        value = self.config.get(key)
        if value is None:
            if required:
                self.fail(key, f"{key} is missing ({what})")
            return default
        if not isinstance(value, kinds) or isinstance(value, bool) and bool not in kinds:
            self.fail(key, f"{key} must be {what}, got {type(value).__name__} {_short(value)}")
        return value

    def task(self, checksum: str) -> Task:
        cfg = self.config
        for key in cfg:
            if key not in KEYS:
                self.fail(key, f"unknown task key {key!r} (the keys read are listed in docs/eval-tasks.md)")
        name = self.get("task", (str,), "the task's name", required=True)
        if not name.strip():
            self.fail("task", "task must be a non-empty name")
        output_type = self.get("output_type", (str,), f"one of {', '.join(OUTPUT_TYPES)}", required=True)
        if output_type not in OUTPUT_TYPES:
            self.fail("output_type", f"output_type {output_type!r} is not run here: only {', '.join(OUTPUT_TYPES)}")
        if cfg.get("dataset_name") is not None:
            self.fail("dataset_name", "dataset_name (a Hugging Face dataset configuration) must be null: the data "
                                      "are local files named in dataset_kwargs.data_files")
        if cfg.get("should_decontaminate") not in (None, False):
            self.fail("should_decontaminate", "should_decontaminate must be false: decontamination is not supported")
        self.get("doc_to_decontamination_query", (str,), "a field name or a template")  # unused without it
        dataset_path = self.get("dataset_path", (str,), f"one of {', '.join(FORMATS)}", required=True)
        if dataset_path not in FORMATS:
            self.fail("dataset_path", f"dataset_path {dataset_path!r}: only local files are read, by format "
                                      f"({', '.join(FORMATS)}), with dataset_kwargs.data_files naming them")
        data_files = self.data_files()
        splits = {key: self.get(key, (str,), "a split name in dataset_kwargs.data_files") for key in SPLIT_KEYS}
        for key, split in splits.items():
            if split is not None and split not in dict(data_files):
                self.fail(key, f"{key} {split!r} has no files in dataset_kwargs.data_files "
                               f"(splits there: {', '.join(s for s, _ in data_files)})")
        if splits["test_split"] is None and splits["validation_split"] is None:
            self.fail(None, "neither test_split nor validation_split is set: there is nothing to evaluate")

        rolling = output_type == "loglikelihood_rolling"
        doc_to_text = self.get("doc_to_text", (str,), "a field name or a template (an int, lm-eval's multiple-input "
                                                      "form, is not supported)", required=not rolling)
        if output_type == "multiple_choice":
            doc_to_choice = self.choices()
            doc_to_target = self.get("doc_to_target", (str, int), "a field name, a template or a choice index",
                                     required=True)
        else:
            if cfg.get("doc_to_choice") is not None:
                self.fail("doc_to_choice", f"doc_to_choice is for multiple_choice tasks, not {output_type}")
            doc_to_choice = None
            doc_to_target = self.get("doc_to_target", (str,), "a field name or a template", required=True)
        sandbox = _sandbox()
        for key, value in (("doc_to_text", doc_to_text), ("doc_to_choice", doc_to_choice),
                           ("doc_to_target", doc_to_target), ("description", cfg.get("description"))):
            if isinstance(value, str):
                try:
                    sandbox.compile_bounded(value)
                except (TemplateError, RecursionError, MemoryError) as e:
                    self.fail(key, f"{key} is not a valid Jinja template: {said(e)}")
        num_fewshot = self.get("num_fewshot", (int,), "a number of examples")
        if num_fewshot is not None and num_fewshot < 0:
            self.fail("num_fewshot", f"num_fewshot must be at least 0, got {num_fewshot}")
        tag = self.get("tag", (str, list), "a tag or a list of tags", default=())
        tag = (tag,) if isinstance(tag, str) else tuple(tag)
        if not all(isinstance(t, str) for t in tag):
            self.fail("tag", "tag must be a tag or a list of tags (strings)")
        metadata = self.get("metadata", (dict,), "a mapping", default={})
        return Task(
            name=name, path=self.path, checksum=checksum, output_type=output_type, dataset_path=dataset_path,
            data_files=data_files, **splits, doc_to_text=doc_to_text, doc_to_choice=doc_to_choice,
            doc_to_target=doc_to_target,
            target_delimiter=self.get("target_delimiter", (str,), "a string", default=" "),
            fewshot_delimiter=self.get("fewshot_delimiter", (str,), "a string", default="\n\n"),
            num_fewshot=num_fewshot, description=self.get("description", (str,), "a string", default=""),
            metric_list=self.metrics(output_type), tag=tag, metadata=self.freeze(metadata, set()))

    def data_files(self) -> tuple[tuple[str, tuple[str, ...]], ...]:
        kwargs = self.get("dataset_kwargs", (dict,), "a mapping with data_files", required=True)
        for key in kwargs:
            if key != "data_files":
                self.fail("dataset_kwargs", f"dataset_kwargs.{key} is not supported (only data_files)")
        files = kwargs.get("data_files")
        if not isinstance(files, dict) or not files:
            self.fail("dataset_kwargs", "dataset_kwargs.data_files must map split names to files")
        base = os.path.realpath(os.path.dirname(os.path.abspath(self.path)))
        out = []
        for split, paths in files.items():
            paths = [paths] if isinstance(paths, str) else paths
            if not isinstance(split, str) or not isinstance(paths, list) or not paths \
                    or not all(isinstance(p, str) and p for p in paths):
                self.fail("dataset_kwargs", f"dataset_kwargs.data_files.{split}: a file or a list of files, "
                                            "relative to the task file's directory")
            resolved = []
            for p in paths:
                # Resolved, links and all, before the check: a link inside the directory that points out of
                # it is refused too.
                real = os.path.realpath(os.path.join(base, p))
                if os.path.commonpath([real, base]) != base:
                    self.fail("dataset_kwargs", f"data file {p!r} (split {split}) lies outside the task file's "
                                                f"directory {base}")
                if not os.path.isfile(real):
                    self.fail("dataset_kwargs", f"data file {real} (split {split}) does not exist")
                resolved.append(real)
            out.append((split, tuple(resolved)))
        return tuple(out)

    def choices(self):
        value = self.config.get("doc_to_choice")
        if isinstance(value, dict):  # lm-eval takes a mapping's values
            value = list(value.values())
        if isinstance(value, list):
            if not value:
                self.fail("doc_to_choice", "the choice list is empty")
            if not all(isinstance(c, str) and c for c in value):
                self.fail("doc_to_choice", "doc_to_choice as a list must hold non-empty strings")
            return tuple(value)
        return self.get("doc_to_choice", (str,), "a field name, a template or a list of choices", required=True)

    def metrics(self, output_type: str) -> tuple[Metric, ...]:
        known = METRICS[output_type]
        entries = self.config.get("metric_list")
        if entries is None:
            return tuple(Metric(m, *known[m]) for m in DEFAULT_METRICS[output_type])
        if not isinstance(entries, list) or not entries:
            self.fail("metric_list", "metric_list must be a list of {metric: NAME, aggregation?, higher_is_better?}")
        out = []
        for entry in entries:
            if not isinstance(entry, dict) or not isinstance(entry.get("metric"), str):
                self.fail("metric_list", f"metric_list entry {_short(entry)} has no metric name")
            name = entry["metric"]
            for key in entry:
                if key not in ("metric", "aggregation", "higher_is_better"):
                    self.fail("metric_list", f"metric_list: {name}: key {key!r} is not supported")
            if name not in known:
                self.fail("metric_list", f"metric {name!r} is not one of {output_type}'s: {', '.join(known)}")
            if any(m.name == name for m in out):
                self.fail("metric_list", f"metric {name!r} is listed twice")
            aggregation = entry.get("aggregation", known[name][0])
            allowed = PAIR_AGGREGATIONS if name in PAIR_METRICS else SCALAR_AGGREGATIONS
            if aggregation not in allowed:
                self.fail("metric_list", f"metric {name}: aggregation {aggregation!r} is not one of "
                                         f"{', '.join(allowed)}")
            higher = entry.get("higher_is_better", known[name][1])
            if not isinstance(higher, bool):
                self.fail("metric_list", f"metric {name}: higher_is_better must be true or false")
            out.append(Metric(name, aggregation, higher))
        return tuple(out)

    def freeze(self, value, active: set):
        # Mappings to (key, value) pairs and lists to tuples; a YAML alias shares a node, so a value that
        # contains itself is refused rather than followed forever.
        if isinstance(value, (dict, list)):
            if id(value) in active:
                self.fail("metadata", "metadata contains itself (a YAML alias)")
            active.add(id(value))
            frozen = tuple((str(k), self.freeze(v, active)) for k, v in value.items()) if isinstance(value, dict) \
                else tuple(self.freeze(v, active) for v in value)
            active.discard(id(value))
            return frozen
        return value
