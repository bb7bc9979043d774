"""Chat templates: a prompt put in the checkpoint's own Jinja template, rendered in a sandbox that bounds
what the template may spend (a template comes with the model, from a stranger)."""

from __future__ import annotations

import functools
import re
import time

from jinja2 import nodes
from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.visitor import NodeTransformer

from .errors import HpcLlamaError
from .tokenizer import Tokenizer

CHAT_TEMPLATE_SECONDS = 5.0
"""Longest a chat template may take to render one prompt (real templates take milliseconds)."""
CHAT_TEMPLATE_CHARS = 1 << 20
"""Size bound of a rendering, in characters (items for lists): what it writes in all, and every value it
builds. A prompt longer than an eighth of it raises the bound to 8 times the prompt's length."""
MAX_INT_BITS = 1 << 16
"""Largest integer a template may compute (about 20,000 digits): `10 ** 10 ** 9` would never end."""


class Limit(TemplateError):
    """A bound of the sandbox was reached."""


_DIGITS = re.compile(r"\d+")
_NESTED_WIDTH = re.compile(r"\{[^{}]*\{|%[^a-zA-Z%]*\*")
# Filters and str methods whose integer arguments say how big the result is.
WIDTHS = {"center", "ljust", "rjust", "zfill", "expandtabs", "indent", "truncate", "wordwrap", "batch",
          "slice", "range", "tojson"}


def _internal(name, args, lineno):
    # Called as environment.<name>: a name no template can define or shadow.
    return nodes.Call(nodes.EnvironmentAttribute(name, lineno=lineno), list(args), [], None, None, lineno=lineno)


class Bounds(NodeTransformer):
    """Routes each loop item, `~` and output write of a parsed template through the sandbox's checks."""

    def visit_For(self, node):
        node = self.generic_visit(node)
        node.iter = _internal("hpc_iter", [node.iter], node.lineno)
        return node

    def visit_Concat(self, node):
        node = self.generic_visit(node)
        return _internal("hpc_concat", node.nodes, node.lineno)

    def visit_Output(self, node):
        node = self.generic_visit(node)
        node.nodes = [_internal("hpc_out", [nodes.Const(c.data, lineno=c.lineno)
                                           if isinstance(c, nodes.TemplateData) else c], c.lineno)
                      for c in node.nodes]
        return node


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """Jinja's own sandbox keeps a template away from Python's internals; this one also bounds what the
    template may spend. Every step it takes in Python goes through a check of the clock and of sizes:
    each call (functions, methods, macros), filter and test; each operator that can make something big
    (`*`, `**`, `+`, `%`, and `~`, which is rewritten into a call); each item of each for-loop; and each
    write of output, in any block or macro. Sizes are checked before the step where they can be
    predicted (a repeated string, a power, a join, a padding width) and on every result, so no value
    and no output grows past the bound, and a loop that writes nothing still meets the clock. A signal
    alarm would be simpler but belongs to the whole process (and only its main thread), and a string
    built in one C call cannot be interrupted by one anyway.
    """

    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self, seconds: float, chars: int, **options):
        super().__init__(**options)
        self.seconds, self.min_chars = seconds, chars
        self.deadline, self.chars, self.written = None, chars, 0
        self.globals.pop("lipsum", None)  # lipsum(n) writes n paragraphs in one call
        self.filters = {name: self._bounded(name, f) for name, f in self.filters.items()}
        self.tests = {name: self._bounded(name, f) for name, f in self.tests.items()}
        self.hpc_iter, self.hpc_concat, self.hpc_out = self._iter, self._concat, self._out
        self._internal = (self.hpc_iter, self.hpc_concat, self.hpc_out)

    def compile_bounded(self, source: str):
        tree = Bounds().visit(self.parse(source))
        tree.set_environment(self)
        return self.from_string(tree)

    def start(self, prompt_chars: int):
        self.chars = max(self.min_chars, 8 * prompt_chars)
        self.deadline, self.written = time.monotonic() + self.seconds, 0

    def stop(self):
        self.deadline = None

    def tick(self):
        # Outside a rendering (the compiler folding constants) nothing runs: it runs, bounded, later.
        if self.deadline is None:
            raise Limit("not rendering")
        if time.monotonic() > self.deadline:
            raise Limit(f"it ran for more than {self.seconds:g} s")

    def size(self, v) -> int:
        """Characters and items in v, a part counted as often as it appears; stops past the bound."""
        total, stack = 0, [v]
        while stack and total <= self.chars:
            x = stack.pop()
            if isinstance(x, (str, bytes)):
                total += len(x)
            elif isinstance(x, (list, tuple, set, frozenset)):
                total += len(x)
                if total <= self.chars:
                    stack.extend(x)
            elif isinstance(x, dict):
                total += len(x)
                if total <= self.chars:
                    stack.extend(x.keys())
                    stack.extend(x.values())
            else:
                total += 1
        return total

    def refuse_over(self, n: int, what: str):
        if n > self.chars:
            raise Limit(f"{what} would be over {self.chars} characters or items")

    def widths(self, fmt, what: str):
        for run in _DIGITS.findall(fmt):
            self.refuse_over(int(run) if len(run) < 12 else self.chars + 1, f"a width in {what}")

    def before(self, name: str, subject, args: list, kwargs: dict) -> list:
        """Refuse a call whose result would pass the bound, where its arguments tell; returns the
        arguments (an iterator to join made a list)."""
        text = subject if isinstance(subject, str) else (args[0] if args and isinstance(args[0], str) else None)
        rest = args if isinstance(subject, str) else args[1:]
        # Where an integer argument is a width or a count, it is bounded; the values a format string
        # formats set a width only through a nested field ({:{}} or %*d).
        formats = name in ("format", "format_map") and text is not None
        if name in WIDTHS and not formats or formats and _NESTED_WIDTH.search(text):
            for v in (*args, *kwargs.values()):
                if isinstance(v, int) and not isinstance(v, bool):
                    self.refuse_over(abs(v), f"{name}'s argument")
        if name == "join":
            if isinstance(subject, str):  # str.join(items)
                sep, items = subject, list(args[0]) if args else []
                args = [items]
            else:  # the join filter: value, d
                items = list(args[0]) if args else []
                sep = str(args[1] if len(args) > 1 else kwargs.get("d", ""))
                args = [items, *args[1:]]
            self.refuse_over(self.size(items) + max(len(items) - 1, 0) * len(sep), "a join")
        elif name == "replace" and text is not None and len(rest) >= 2:
            old, new = str(rest[0]), str(rest[1])
            count = text.count(old) if old else len(text) + 1
            self.refuse_over(len(text) + count * max(len(new) - len(old), 0), "a replace")
        elif name == "indent" and text is not None:
            width = rest[0] if rest else kwargs.get("width", 4)
            step = len(width) if isinstance(width, str) else int(width) if isinstance(width, int) else 0
            self.refuse_over(len(text) + (text.count("\n") + 1) * step, "an indent")
        elif name == "expandtabs" and text is not None:
            tab = rest[0] if rest and isinstance(rest[0], int) else 8
            self.refuse_over(len(text) + text.count("\t") * tab, "expandtabs")
        elif name == "translate" and text is not None and rest and isinstance(rest[0], dict):
            longest = max((len(v) for v in rest[0].values() if isinstance(v, str)), default=1)
            self.refuse_over(len(text) * max(longest, 1), "a translate")
        elif name in ("format", "format_map") and text is not None:
            self.widths(text, "a format string")
        return args

    def after(self, result):
        self.refuse_over(self.size(result), "a value")
        return result

    def _bounded(self, name, f):
        @functools.wraps(f)  # keeps jinja_pass_arg: the context or environment still comes first
        def run(*args, **kwargs):
            self.tick()
            passed = args[:1] if getattr(f, "jinja_pass_arg", None) is not None else ()
            args = list(passed) + self.before(name, None, list(args[len(passed):]), kwargs)
            return self.after(f(*args, **kwargs))

        return run

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (the sandbox's own signature)
        if any(__obj is f for f in __self._internal):
            return __obj(*args)
        __self.tick()
        method = getattr(__obj, "__wrapped__", __obj)  # str.format comes wrapped by the sandbox
        name, subject = getattr(method, "__name__", ""), getattr(method, "__self__", None)
        args = __self.before(name, subject, list(args), kwargs)
        return __self.after(super().call(__context, __obj, *args, **kwargs))

    def call_binop(self, context, operator, left, right):
        self.tick()
        ints = isinstance(left, int) and isinstance(right, int)
        if operator == "**" and ints and abs(left) > 1 and right > 0:
            if right > MAX_INT_BITS or right * left.bit_length() > MAX_INT_BITS:
                raise Limit(f"{left} ** {right} would have over {MAX_INT_BITS} bits")
        elif operator == "*" and ints:
            if left.bit_length() + right.bit_length() > MAX_INT_BITS:
                raise Limit(f"a product would have over {MAX_INT_BITS} bits")
        elif operator == "*":
            seq, n = (left, right) if isinstance(right, int) else (right, left)
            if isinstance(n, int) and isinstance(seq, (str, list, tuple)):
                self.refuse_over(self.size(seq) * max(n, 0), "a repetition")
        elif operator == "+" and not ints:
            self.refuse_over(self.size(left) + self.size(right), "a sum")
        elif operator == "%" and isinstance(left, str):
            self.widths(left, "a format string")
            for v in (right if isinstance(right, tuple) else (right,)) if _NESTED_WIDTH.search(left) else ():
                if isinstance(v, int):
                    self.refuse_over(abs(v), "a % argument")
        return self.after(super().call_binop(context, operator, left, right))

    def _iter(self, iterable):
        self.tick()
        for item in iterable:
            self.tick()
            yield item

    def _concat(self, *parts):
        self.tick()
        self.refuse_over(sum(self.size(p) for p in parts), "a ~ concatenation")
        return self.after("".join(map(str, parts)))

    def _out(self, value):
        self.tick()
        n = len(value) if isinstance(value, str) else len(str(value)) if self.size(value) <= self.chars else \
            self.chars + 1
        self.written += n
        if self.written > self.chars:
            raise Limit(f"it wrote more than {self.chars} characters")
        return value


class ChatTokenizer:
    """A tokenizer that first puts each text in the checkpoint's chat template, as one user turn.

    The template is tokenizer_config.json's Jinja `chat_template`, rendered in
    a sandbox as transformers' `apply_chat_template(add_generation_prompt=True)`
    does; the special tokens it writes (<|im_start|>, ...) encode as themselves.
    The template comes with the model, from a stranger: it runs bounded in time
    (`seconds`) and size (`chars`, see `BoundedSandbox`), and anything it
    does wrong is a one-line error.
    """

    def __init__(self, tokenizer: Tokenizer, template: str, special: dict,
                 seconds: float = CHAT_TEMPLATE_SECONDS, chars: int = CHAT_TEMPLATE_CHARS):
        from jinja2.exceptions import TemplateError

        def raise_exception(message):
            raise TemplateError(message)

        self.env = BoundedSandbox(seconds, chars, trim_blocks=True, lstrip_blocks=True)
        self.env.globals["raise_exception"] = raise_exception
        try:
            self.template = self.env.compile_bounded(template)
        except (TemplateError, RecursionError, MemoryError) as e:
            raise HpcLlamaError(f"the checkpoint's chat template does not parse: {_said(e)}") from None
        self.tokenizer, self.special = tokenizer, special
        self.vocab_size = tokenizer.vocab_size

    @classmethod
    def from_checkpoint(cls, reader, tokenizer: Tokenizer) -> ChatTokenizer:
        from .tokenizer import json_asset

        config = json_asset(reader, "tokenizer_config.json") or {}
        template = config.get("chat_template")
        if not template or not isinstance(template, str):
            raise HpcLlamaError("--chat: the checkpoint has no chat template (tokenizer_config.json chat_template)")
        special = {k: v for k, v in config.items() if k in ("bos_token", "eos_token") and isinstance(v, str)}
        return cls(tokenizer, template, special)

    def render(self, text: str) -> str:
        from jinja2.exceptions import TemplateError

        self.env.start(len(text))
        try:
            return self.template.render(messages=[{"role": "user", "content": text}], add_generation_prompt=True,
                                        **self.special)
        except TemplateError as e:
            raise HpcLlamaError(f"the chat template failed: {_said(e)}") from None
        except (Exception, RecursionError, MemoryError) as e:  # the template is code from the model file
            raise HpcLlamaError(f"the chat template failed: {type(e).__name__}: {_said(e)}") from None
        finally:
            self.env.stop()

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer.encode_batch([self.render(t) for t in texts])

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(self.render(text))

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens)

    def token_id(self, token: str) -> int | None:
        return self.tokenizer.token_id(token)


def _said(e: BaseException, limit: int = 200) -> str:
    """An exception's message on one line and cut short: a template's raise_exception says what it likes."""
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[:limit] + "..."
