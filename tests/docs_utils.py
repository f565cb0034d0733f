"""Reading the commands out of the docs, and running them in a scratch shell session.

The convention is described at the top of tests/test_docs.py. This module holds the mechanics:
markdown fences and `<!-- docs-test: ... -->` markers (`parse_doc`), output patterns with
`...` lines and `vary` regexes (`output_mismatch`), and `Session`, a scratch copy of the
repository in which one doc's commands run one after another like in one terminal.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import resource
import shlex
import shutil
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCS = ["README.md", *sorted(f"docs/{p.name}" for p in (REPO / "docs").glob("*.md"))]

SHELL_TAGS = {"bash", "sh", "shell"}  # commands only (a `$ ` prompt is allowed)
CONSOLE_TAGS = {"console"}  # `$ command` lines, each followed by its expected output
OTHER_TAGS = {"text", "toml", "python", "json", "yaml"}  # never run
MARKER_KEYS = {"skip", "covered-by", "match", "env", "vary", "synopsis"}
# A line of a non-shell block that starts like this looks like a command the reader would type:
# such a block must say it is not one (`<!-- docs-test: synopsis -->`).
COMMAND_START = re.compile(r"^(\$ |python3? |\.venv/bin/|make |bash |gcloud |[A-Z_]+=\S* +python)")

_FENCE = re.compile(r"^(`{3,})(.*)$")
_MARKER = re.compile(r"^<!--\s*docs-test:(.*?)-->\s*$")


class DocError(ValueError):
  """A doc breaks the convention (untagged block, bad marker, ...); the message says where."""


@dataclasses.dataclass
class Marker:
  """One `<!-- docs-test: key=value ... -->` comment placed right before a fenced block."""

  line: int
  skip: str = ""  # reason the command is not run here
  covered_by: str = ""  # a doc that shows (and so runs) the identical command
  match: str = ""  # the marker applies to commands containing this text (default: all)
  env: tuple[str, ...] = ()  # set-up hooks, see test_docs.SETUPS
  vary: tuple[str, ...] = ()  # regexes for parts of the expected output that differ per run
  synopsis: bool = False  # a non-shell block whose lines look like commands but are not

  def applies(self, command: str) -> bool:
    return not self.match or self.match in command


@dataclasses.dataclass
class Command:
  """One command of a shell or console block, continuation lines joined, comments removed."""

  doc: str
  line: int  # where it starts in the doc (1-based)
  text: str
  expected: list[str] | None  # console blocks: the documented output lines
  markers: list[Marker]

  @property
  def id(self) -> str:
    return f"{self.doc}:{self.line}"

  @property
  def skip(self) -> str:
    return next((m.skip for m in self.markers if m.skip), "")

  @property
  def covered_by(self) -> str:
    return next((m.covered_by for m in self.markers if m.covered_by), "")

  @property
  def env(self) -> list[str]:
    return [name for m in self.markers for name in m.env]

  @property
  def vary(self) -> list[str]:
    return [v for m in self.markers for v in m.vary]


@dataclasses.dataclass
class Block:
  """A fenced block: its tag (first word of the info string), body lines and markers."""

  doc: str
  line: int  # the opening fence's line (1-based)
  tag: str
  body: list[str]
  markers: list[Marker]
  commands: list[Command]


def parse_marker(text: str, line: int, where: str) -> Marker:
  """`skip="reason" match=text env=a,b vary=REGEX covered-by=docs/x.md synopsis`."""
  marker = Marker(line=line)
  try:
    words = shlex.split(text)
  except ValueError as e:
    raise DocError(f"{where}: bad docs-test marker ({e})") from e
  for word in words:
    key, _, value = word.partition("=")
    if key not in MARKER_KEYS:
      raise DocError(f"{where}: unknown docs-test key {key!r} (known: {sorted(MARKER_KEYS)})")
    if key == "synopsis":
      marker.synopsis = True
    elif not value:
      raise DocError(f"{where}: docs-test key {key!r} needs a value")
    elif key == "skip":
      marker.skip = value
    elif key == "covered-by":
      marker.covered_by = value
    elif key == "match":
      marker.match = value
    elif key == "env":
      marker.env += tuple(value.split(","))
    elif key == "vary":
      re.compile(value)
      marker.vary += (value,)
  return marker


def strip_comment(command: str) -> str:
  """`command  # comment` -> `command`: a `#` starting a word, outside quotes."""
  quote = ""
  prev = " "
  for i, ch in enumerate(command):
    if quote:
      if ch == quote:
        quote = ""
    elif ch in "'\"":
      quote = ch
    elif ch == "#" and prev.isspace():
      return command[:i].rstrip()
    elif ch == "\\":
      prev = ""
      continue
    prev = ch
  return command.rstrip()


def _commands(doc: str, block: Block) -> list[Command]:
  """The commands of a shell or console block (see the convention in tests/test_docs.py)."""
  console = block.tag in CONSOLE_TAGS
  out: list[Command] = []
  pending: list[str] = []
  start = 0
  for offset, raw in enumerate(block.body):
    number = block.line + 1 + offset
    line = raw.rstrip()
    if pending:  # continuation of the previous line
      line = line.removeprefix("> ")
    elif line.startswith("$ "):
      line, start = line[2:], number
    elif console:
      if not out and line.strip():
        raise DocError(f"{doc}:{number}: console block output before any `$ ` command")
      if out:
        out[-1].expected.append(line)
      continue
    else:
      start = number
    if line.endswith("\\"):
      pending.append(line[:-1].strip())
      continue
    text = strip_comment(" ".join([*pending, line.strip()]).strip())
    pending = []
    if text:
      out.append(Command(doc, start, text, [] if console else None,
                         [m for m in block.markers if m.applies(text)]))
  if pending:
    raise DocError(f"{doc}:{block.line}: block ends inside a `\\` continuation")
  for command in out:  # trailing blank lines of the output are not part of it
    while command.expected and not command.expected[-1].strip():
      command.expected.pop()
  return out


def parse_doc(doc: str, text: str | None = None) -> list[Block]:
  """Every fenced block of `doc` (a path relative to the repository) with its markers."""
  text = (REPO / doc).read_text() if text is None else text
  lines = text.splitlines()
  blocks: list[Block] = []
  markers: list[Marker] = []
  i = 0
  while i < len(lines):
    line = lines[i]
    m = _MARKER.match(line.strip())
    if m:
      markers.append(parse_marker(m[1], i + 1, f"{doc}:{i + 1}"))
      i += 1
      continue
    fence = _FENCE.match(line)
    if fence:
      ticks, info = fence[1], fence[2].strip()
      end = i + 1
      while end < len(lines) and lines[end].strip() != ticks:
        end += 1
      if end == len(lines):
        raise DocError(f"{doc}:{i + 1}: unclosed code block")
      tag = info.split()[0] if info else ""
      block = Block(doc, i + 1, tag, lines[i + 1:end], markers, [])
      check_block(block)
      if tag in SHELL_TAGS | CONSOLE_TAGS:
        block.commands = _commands(doc, block)
        for marker in markers:
          if marker.match and not any(marker.match in c.text for c in block.commands):
            raise DocError(f"{doc}:{marker.line}: match={marker.match!r} matches no command "
                           "of the block below")
      blocks.append(block)
      markers = []
      i = end + 1
      continue
    if markers and line.strip():
      raise DocError(f"{doc}:{markers[0].line}: a docs-test marker must come right before a "
                     "fenced block (blank lines and other markers may come between)")
    i += 1
  if markers:
    raise DocError(f"{doc}:{markers[0].line}: docs-test marker without a block below it")
  return blocks


def check_block(block: Block) -> None:
  """Tag known; non-shell blocks carry no run markers and hold no command-like lines."""
  where = f"{block.doc}:{block.line}"
  if not block.tag:
    raise DocError(f"{where}: untagged code block: tag it ```bash (commands to run), ```console "
                   "($ commands with their output) or ```text (output, diagrams)")
  if block.tag not in SHELL_TAGS | CONSOLE_TAGS | OTHER_TAGS:
    raise DocError(f"{where}: unknown code block tag {block.tag!r}")
  if block.tag in SHELL_TAGS | CONSOLE_TAGS:
    if any(m.synopsis for m in block.markers):
      raise DocError(f"{where}: `synopsis` is for non-shell blocks")
    return
  if any(m.skip or m.covered_by or m.env or m.vary or m.match for m in block.markers):
    raise DocError(f"{where}: docs-test markers other than `synopsis` need a ```bash or "
                   "```console block")
  looks_like = [ln for ln in block.body if COMMAND_START.match(ln)]
  if looks_like and not any(m.synopsis for m in block.markers):
    raise DocError(f"{where}: ```{block.tag} block with a command line ({looks_like[0]!r}): make "
                   "it ```bash or ```console, or mark it <!-- docs-test: synopsis -->")


def all_commands() -> list[Command]:
  return [c for doc in DOCS for block in parse_doc(doc) for c in block.commands]


# ---------------------------------------------------------------------------- expected output

def _line_pattern(documented: str, vary: list[str]) -> re.Pattern:
  """The documented line as a regex: literal, except spans matching a `vary` regex."""
  spans: list[tuple[int, int, str]] = []
  for v in vary:
    spans += [(m.start(), m.end(), v) for m in re.finditer(v, documented) if m.end() > m.start()]
  spans.sort()
  parts, pos = [], 0
  for start, end, v in spans:
    if start < pos:
      continue  # overlaps an earlier span
    parts += [re.escape(documented[pos:start]), f"(?:{v})"]
    pos = end
  parts.append(re.escape(documented[pos:]))
  return re.compile("".join(parts))


def output_mismatch(expected: list[str], actual: list[str], vary: list[str]) -> str:
  """'' when `actual` lines match the documented ones, else what differs.

  Each documented line must equal one actual line (trailing spaces aside), in order and with
  nothing between them; a documented line `...` matches any number of lines; parts of a line
  matching a `vary` regex may differ (the actual text must match the same regex).
  """
  actual = [a.rstrip() for a in actual]
  patterns = [None if e.strip() == "..." else _line_pattern(e.rstrip(), vary) for e in expected]

  def match(i: int, j: int) -> bool:
    if i == len(patterns):
      return j == len(actual)
    if patterns[i] is None:
      return any(match(i + 1, k) for k in range(j, len(actual) + 1))
    return j < len(actual) and bool(patterns[i].fullmatch(actual[j])) and match(i + 1, j + 1)

  if match(0, 0):
    return ""
  for i, p in enumerate(patterns):  # name the first documented line that is nowhere
    if p is not None and not any(p.fullmatch(a) for a in actual):
      return f"documented line {i + 1} not in the output:\n  {expected[i]}"
  return "the documented lines are all there, but not in this order or with other lines between"


# ---------------------------------------------------------------------------- sessions

def copy_repo(dest: Path) -> None:
  """The working tree's files (tracked and untracked, not ignored) and a link to its .venv."""
  res = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                       cwd=REPO, capture_output=True)
  if res.returncode != 0:  # not a git checkout (a source archive): everything but the caches
    shutil.copytree(REPO, dest, dirs_exist_ok=True, symlinks=True, ignore=shutil.ignore_patterns(
        ".venv", ".git", "__pycache__", "*.egg-info", ".pytest_cache", ".ruff_cache"))
  for name in res.stdout.decode().split("\0") if res.returncode == 0 else []:
    src = REPO / name
    if name and src.is_file():
      (dest / name).parent.mkdir(parents=True, exist_ok=True)
      shutil.copy2(src, dest / name)
  (dest / ".venv").symlink_to(REPO / ".venv")


@dataclasses.dataclass
class Result:
  command: str  # what ran (the documented text after the listed rewrites)
  returncode: int
  output: str  # stdout and stderr, interleaved
  seconds: float
  cpu_seconds: float  # user + system time of the command and its children


class Session:
  """One doc's terminal: a scratch repository copy as the working directory, exported variables
  and the current directory carried from one command to the next, `/tmp/...`, `/data/...` and
  `/models/...` placed under `root/fs`. `xla_flags` is the commands' XLA_FLAGS (none: XLA's
  defaults; the caller's own XLA_FLAGS never reach the session).
  """

  def __init__(self, doc: str, root: Path, xla_flags: str = ""):
    self.doc, self.root = doc, root
    self.cwd = root / "repo"
    self.fs = root / "fs"
    self.state = root / "state"
    scratch = [self.fs / "tmp", self.fs / "data", self.fs / "models"]
    for d in (self.cwd, self.state, root / "tmp", *scratch):
      d.mkdir(parents=True)
    copy_repo(self.cwd)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MAXGEMMA_", "PYTEST_", "FAKE_GCLOUD_")) and k != "XLA_FLAGS"}
    env.update(PATH=f"{REPO / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}",
               TMPDIR=str(root / "tmp"), JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
               PYTHONDONTWRITEBYTECODE="1")
    env.pop("VIRTUAL_ENV", None)
    if xla_flags:
      env["XLA_FLAGS"] = xla_flags
    self.env = env
    self.setups_done: set[str] = set()
    self.data: dict = {}  # what set-up hooks leave for the checks (e.g. the fake gcloud)
    self.stack = contextlib.ExitStack()  # servers and the like, closed by close()

  def close(self) -> None:
    self.stack.close()

  def run(self, command: str, timeout: float = 600) -> Result:
    """Runs `command` with bash, in this session's directory and environment."""
    script = self.state / "command.sh"
    script.write_text(f"{command}\n__docs_rc=$?\nenv -0 > {shlex.quote(str(self.state / 'env'))}"
                      f"\npwd > {shlex.quote(str(self.state / 'cwd'))}\nexit $__docs_rc\n")
    start, usage = time.time(), resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
      proc = subprocess.run(["bash", str(script)], cwd=self.cwd, env=self.env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, timeout=timeout)
      rc, output = proc.returncode, proc.stdout
    except subprocess.TimeoutExpired as e:
      out = e.stdout or b""
      rc, output = -1, (out.decode() if isinstance(out, bytes) else out) + "\n(timed out)"
    if (self.state / "env").exists():  # what `export`, `. activate` and `cd` changed carries on
      pairs = (self.state / "env").read_bytes().decode().split("\0")
      self.env = dict(p.split("=", 1) for p in pairs if "=" in p)
      for k in ("__docs_rc", "PWD", "OLDPWD", "SHLVL", "_"):
        self.env.pop(k, None)
      self.cwd = Path((self.state / "cwd").read_text().strip())
      (self.state / "env").unlink()
    now = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = now.ru_utime + now.ru_stime - usage.ru_utime - usage.ru_stime
    return Result(command, rc, output, time.time() - start, cpu)
