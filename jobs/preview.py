"""`sdbatch preview`: a contact sheet of a dataset's first images, to look before scaling up.

The images are the first N of the finished shards' metadata (shard by shard, in manifest order
inside a shard) that match `--where`, each drawn as a thumbnail with its id, seed and the start
of its prompt. The dataset may be anywhere fsspec reaches and may be unfinished: only shards
whose metadata file exists are read, and reading stops once N rows are found.

`--where` is a small filter language over the metadata columns, compiled to a pyarrow.compute
expression (never evaluated as Python):

    expr  := term ('or' term)*          term := factor ('and' factor)*
    factor:= 'not' factor | '(' expr ')' | NAME OP VALUE | NAME ['not'] 'in' '(' VALUE, ... ')'
    OP    := == != < <= > >=            VALUE := 'text' | "text" | 12 | -0.5 | 1e3 | true | false

NAME is a column name, or any name in backquotes (`my column`); keywords are case-insensitive;
text compares with text and numbers with numbers, and a null never matches.
"""
import difflib
import functools
import io
import math
import operator
import posixpath
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Annotated

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import typer
from PIL import Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError

from jobs import sink, storage
from jobs.cli_common import StorageOptions, storage_options, user_errors

PAD = 8
CAPTION_LINES = 4  # id, seed, two lines of prompt
BACKGROUND = (24, 24, 24)
TEXT = (232, 232, 232)
DIM = (150, 150, 150)
READ_THREADS = 8  # object stores answer slowly but in parallel


class PreviewError(sink.OutputError):
    """No preview can be drawn: OUT is not a dataset (yet), `--where` is malformed, nothing matches."""


# ------------------------------------------------------------------------------------ --where

_TOKEN = re.compile(r"""
    (?P<space>\s+)
  | (?P<number>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)
  | (?P<string>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")
  | (?P<op>==|!=|<=|>=|<|>|\(|\)|,)
  | (?P<name>[A-Za-z_][A-Za-z0-9_]*|`[^`]+`)
""", re.VERBOSE)
KEYWORDS = ("and", "or", "not", "in", "true", "false")
KINDS = {"text": "text", "number": "numbers", "boolean": "booleans"}
COMPARE = {"==": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}


@dataclass(frozen=True)
class _Token:
    kind: str  # number, string, op, name, keyword, end
    text: str
    pos: int


def _tokens(text: str) -> list[_Token]:
    tokens, pos = [], 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            c = text[pos]
            problem = (f"unterminated string starting at position {pos}" if c in "'\"" else
                       f"'=' at position {pos} is not an operator; compare with ==" if c == "=" else
                       f"unexpected {c!r} at position {pos}")
            raise PreviewError(f"--where {text!r}: {problem}")
        kind = m.lastgroup
        if kind == "name" and m.group().lower() in KEYWORDS:
            kind = "keyword"
        if kind != "space":
            tokens.append(_Token(kind, m.group(), pos))
        pos = m.end()
    return tokens + [_Token("end", "", len(text))]


def parse_where(text: str, schema: pa.Schema) -> pc.Expression:
    """A `--where` filter over columns of `schema` → a pyarrow.compute expression (PreviewError if malformed)."""
    return _Parser(text, schema).parse()


class _Parser:
    """Recursive descent over the grammar in the module docstring, one method per rule."""

    def __init__(self, text: str, schema: pa.Schema):
        self.text, self.schema = text, schema
        self.tokens, self.i = _tokens(text), 0

    def parse(self) -> pc.Expression:
        expr = self.expr()
        if self.peek().kind != "end":
            self.fail("expected 'and', 'or' or the end")
        return expr

    def peek(self) -> _Token:
        return self.tokens[self.i]

    def take(self) -> _Token:
        token = self.tokens[self.i]
        self.i += 1
        return token

    def accept(self, word: str) -> bool:
        token = self.peek()
        if token.text.lower() == word and token.kind in ("keyword", "op"):
            self.i += 1
            return True
        return False

    def fail(self, expected: str, token: _Token | None = None):
        token = token or self.peek()
        got = "the end" if token.kind == "end" else f"{token.text!r} at position {token.pos}"
        raise PreviewError(f"--where {self.text!r}: {expected}, got {got}")

    def expr(self) -> pc.Expression:
        result = self.term()
        while self.accept("or"):
            result = result | self.term()
        return result

    def term(self) -> pc.Expression:
        result = self.factor()
        while self.accept("and"):
            result = result & self.factor()
        return result

    def factor(self) -> pc.Expression:
        if self.accept("not"):
            return ~self.factor()
        if self.accept("("):
            result = self.expr()
            if not self.accept(")"):
                self.fail("expected ')'")
            return result
        name, kind = self.column()
        negate = self.accept("not")
        if negate or self.peek().text.lower() == "in":
            if not self.accept("in") or not self.accept("("):
                self.fail("expected 'in (' after 'not'" if negate else "expected '(' after 'in'")
            values = [self.value(name, kind)]
            while self.accept(","):
                if self.peek().text == ")":
                    break  # a trailing comma
                values.append(self.value(name, kind))
            if not self.accept(")"):
                self.fail("expected ',' or ')'")
            # == per value rather than is_in, so that a null is unknown here too (is_in says False,
            # and `not in` would then match nulls that `!=` does not)
            result = functools.reduce(operator.or_, (pc.field(name) == v for v in values))
            return ~result if negate else result
        op = self.take()
        if op.text not in COMPARE:
            self.fail(f"expected a comparison ({' '.join(COMPARE)}) or 'in' after {name!r}", op)
        return COMPARE[op.text](pc.field(name), self.value(name, kind))

    def column(self) -> tuple[str, str]:
        token = self.take()
        if token.kind != "name":
            self.fail("expected a column name", token)
        name = token.text.strip("`")
        if name not in self.schema.names:
            close = difflib.get_close_matches(name, self.schema.names, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise PreviewError(f"--where {self.text!r}: no column {name!r}; {hint}(columns: {', '.join(self.schema.names)})")
        kind = _kind(self.schema.field(name).type)
        if kind is None:
            raise PreviewError(f"--where {self.text!r}: column {name!r} holds {self.schema.field(name).type}; "
                               "only text, numbers and booleans can be compared")
        return name, kind

    def value(self, name: str, kind: str):
        token = self.take()
        if token.kind == "string":
            value, got = re.sub(r"\\(.)", r"\1", token.text[1:-1]), "text"
        elif token.kind == "number":
            value, got = (float(token.text) if re.search(r"[.eE]", token.text) else int(token.text)), "number"
        elif token.kind == "keyword" and token.text.lower() in ("true", "false"):
            value, got = token.text.lower() == "true", "boolean"
        else:
            self.fail("expected a value ('text', a number, true or false)", token)
        if got != kind:
            raise PreviewError(f"--where {self.text!r}: column {name!r} holds {KINDS[kind]}, but {token.text} is "
                               f"{'text' if got == 'text' else 'a ' + got}" + ("; put text in quotes" if kind == "text" else ""))
        return value


def _kind(t: pa.DataType) -> str | None:
    if pa.types.is_dictionary(t):
        t = t.value_type
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return "text"
    if pa.types.is_boolean(t):
        return "boolean"
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t):
        return "number"
    return None


# ------------------------------------------------------------------------------- selecting rows

def select(out: sink.Output, n: int, where: str | None = None) -> pa.Table:
    """The first `n` images of the finished shards that match `where`: id, seed, prompt, image_path."""
    if out.read_job() is None:
        raise PreviewError(f"{out.name}: not an sdbatch dataset (no {sink.JOB_FILE})")
    done = sorted(out.done_shards())
    if not done:
        raise PreviewError(f"{out.name}: no finished shards yet, so no images to show")
    try:
        table = _first_rows(out, done, n, where)
    except ARROW_ERRORS as e:
        # A damaged metadata file: leave out the shards `status` finds damaged, and say so.
        damaged = out.status(failures=0).damaged
        if not damaged:
            raise _unreadable(out, where, e) from None
        for problem in damaged.values():
            typer.echo(f"sdbatch: warning: left out {problem}; the next `sdbatch run` redoes its shard", err=True)
        done = [s for s in done if s not in damaged]
        if not done:
            raise PreviewError(f"{out.name}: every finished shard's metadata is damaged") from None
        try:
            table = _first_rows(out, done, n, where)
        except ARROW_ERRORS as e:
            raise _unreadable(out, where, e) from None
    if table.num_rows == 0:
        raise PreviewError(f"{out.name}: no images match --where {where!r}" if where else
                           f"{out.name}: the finished shards hold no images (see `sdbatch status` for failures)")
    return table


ARROW_ERRORS = (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError, OSError)


def _first_rows(out: sink.Output, shards: list[str], n: int, where: str | None) -> pa.Table:
    # Arrow's own local file system for local paths: fsspec's Python files race with interpreter exit.
    fs = None if storage.is_local(out.fs) else out.fs
    dataset = ds.dataset([out.path(sink.metadata_path(s)) for s in shards], format="parquet", filesystem=fs)
    expression = parse_where(where, dataset.schema) if where else None
    return dataset.head(n, columns=["id", "seed", "prompt", "image_path"], filter=expression)


def _unreadable(out: sink.Output, where: str | None, e: Exception) -> PreviewError:
    return PreviewError(f"{out.name}: cannot read the metadata{' with --where ' + repr(where) if where else ''}: {e}")


# ------------------------------------------------------------------------------------ drawing

@dataclass(frozen=True)
class Grid:
    """Where things go on a sheet of `count` tiles: a title line, then rows of thumbnails with captions."""

    count: int
    columns: int
    thumb: int  # thumbnails fit a thumb x thumb box
    line: int  # caption line height

    @property
    def cols(self) -> int:
        return min(self.columns, self.count)

    @property
    def rows(self) -> int:
        return math.ceil(self.count / self.cols)

    @property
    def cell_height(self) -> int:
        return self.thumb + 2 + CAPTION_LINES * self.line

    @property
    def size(self) -> tuple[int, int]:
        return PAD + self.cols * (self.thumb + PAD), PAD + self.line + PAD + self.rows * (self.cell_height + PAD)

    def thumb_box(self, i: int) -> tuple[int, int, int, int]:
        row, col = divmod(i, self.cols)
        x = PAD + col * (self.thumb + PAD)
        y = PAD + self.line + PAD + row * (self.cell_height + PAD)
        return x, y, x + self.thumb, y + self.thumb


@functools.cache
def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default()


def grid(count: int, columns: int, thumb: int) -> Grid:
    """The layout of a sheet of `count` images with the default font."""
    return Grid(count, columns, thumb, line=_font().getbbox("Ag|jy")[3] + 3)


def _fit(text: str, font, width: int) -> str:
    """`text` cut to `width` pixels, ending in '...' when cut."""
    text = " ".join(text.split())  # newlines and runs of spaces would break the caption layout
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "...") > width:
        text = text[:-1]
    return text + "..."


def _wrap(text: str, font, width: int, lines: int) -> list[str]:
    """Up to `lines` lines of `text`, broken between words; the last one cut with '...' if needed."""
    words, out = text.split(), []
    while words and len(out) < lines - 1:
        line = words.pop(0)
        while words and font.getlength(f"{line} {words[0]}") <= width:
            line += " " + words.pop(0)
        out.append(_fit(line, font, width))
    if words:
        out.append(_fit(" ".join(words), font, width))
    return out


def contact_sheet(images: list[Image.Image | None], captions: list[tuple[str, str, str]], *,
                  columns: int, thumb: int, title: str) -> Image.Image:
    """Thumbnails in a grid, each with an (id, seed, prompt) caption; None draws a 'missing' tile."""
    font, layout = _font(), grid(len(images), columns, thumb)
    sheet = Image.new("RGB", layout.size, BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    draw.text((PAD, PAD), _fit(title, font, layout.size[0] - 2 * PAD), font=font, fill=TEXT)
    for i, (image, (image_id, seed, prompt)) in enumerate(zip(images, captions)):
        x0, y0, x1, y1 = layout.thumb_box(i)
        if image is None:
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=DIM)
            draw.text((x0 + 4, y0 + 4), "image missing", font=font, fill=DIM)
        else:
            thumb_image = ImageOps.contain(image, (thumb, thumb), Image.Resampling.LANCZOS)
            sheet.paste(thumb_image, (x0 + (thumb - thumb_image.width) // 2, y0 + (thumb - thumb_image.height) // 2))
        lines = [(_fit(image_id, font, thumb), TEXT), (_fit(f"seed {seed}", font, thumb), DIM)]
        lines += [(line, TEXT) for line in _wrap(prompt, font, thumb, CAPTION_LINES - 2)]
        for k, (line, colour) in enumerate(lines):
            draw.text((x0, y1 + 2 + k * layout.line), line, font=font, fill=colour)
    return sheet


def _load(out: sink.Output, rel: str) -> Image.Image | None:
    try:
        data = storage.read_bytes(out.fs, out.path(rel), retry=out.retry)
        with Image.open(io.BytesIO(data)) as im:
            return im.convert("RGB")
    except (FileNotFoundError, UnidentifiedImageError):
        return None


def preview(dataset: str, sheet: str, *, n: int = 64, where: str | None = None, columns: int = 8, thumb_size: int = 160,
            storage_options: dict | None = None) -> int:
    """Draw the contact sheet of `dataset` (an sdbatch output URL) into `sheet`; returns the images shown."""
    if n < 1 or columns < 1 or thumb_size < 16:
        raise PreviewError(f"--n and --columns must be at least 1 and --thumb-size at least 16 "
                           f"(got {n}, {columns}, {thumb_size})")
    sheet_fs, sheet_path = storage.resolve(sheet, storage_options)
    fmt = Image.registered_extensions().get(posixpath.splitext(sheet_path)[1].lower())
    if fmt is None:
        raise PreviewError(f"-o {storage.redact_url(sheet)}: cannot tell the image format from the name; use .png or .jpg")
    out = sink.Output(dataset, storage_options)
    rows = select(out, n, where)
    with ThreadPoolExecutor(READ_THREADS) as pool:
        images = list(pool.map(lambda rel: _load(out, rel), rows.column("image_path").to_pylist()))
    captions = list(zip(*(rows.column(c).to_pylist() for c in ("id", "seed", "prompt"))))
    captions = [(str(i), str(s), p or "") for i, s, p in captions]
    title = f"{out.name}: {len(images)} image{'s' if len(images) != 1 else ''}" + (f" where {where}" if where else "")
    image = contact_sheet(images, captions, columns=columns, thumb=thumb_size, title=title)
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    storage.write_atomic(sheet_fs, sheet_path, buf.getvalue())
    return len(images)


@user_errors
def preview_command(
    dataset: Annotated[str, typer.Argument(metavar="OUT", help="An sdbatch output dataset: a path or fsspec URL.", show_default=False)],
    output: Annotated[str, typer.Option("-o", "--output", help="Where to write the contact sheet (.png, .jpg, ...; path or fsspec URL).")] = "preview.png",
    n: Annotated[int, typer.Option("-n", "--n", help="How many images (the first ones, shard by shard).")] = 64,
    where: Annotated[str | None, typer.Option(
        "--where", help="Only rows matching e.g. \"scheduler == 'ddim' and steps >= 20\" (==, !=, <, <=, >, >=, "
                        "in (...), and, or, not, parentheses).", show_default=False)] = None,
    columns: Annotated[int, typer.Option("--columns", help="Thumbnails per row of the sheet.")] = 8,
    thumb_size: Annotated[int, typer.Option("--thumb-size", help="Thumbnail box size in pixels.")] = 160,
    storage_option: StorageOptions = None,
) -> None:
    """Draw a contact sheet of a dataset's first images with their id, seed and prompt."""
    shown = preview(dataset, output, n=n, where=where, columns=columns, thumb_size=thumb_size,
                    storage_options=storage_options(storage_option))
    typer.echo(f"wrote {storage.redact_url(output)}: {shown} image{'s' if shown != 1 else ''}")
