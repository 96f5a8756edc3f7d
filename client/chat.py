"""`moed chat`: an interactive chat with the running daemon, rendered as markdown; `moed run`: one answer.

Commands: /stats (the daemon's figures), /reset (forget the conversation), /system TEXT (set the
system prompt and reset), /exit.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.markdown import Markdown

from moed.client.client import Client, RequestRejected
from moed.client.ps import ps_view
from moed.ipc.messages import Finished

HELP = "commands: /stats, /reset, /system TEXT, /exit"


class Conversation:
    """The message list sent with every turn."""

    def __init__(self, system: str | None = None):
        self.system = system
        self.turns: list[dict] = []

    def messages(self, user: str) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.turns + [{"role": "user", "content": user}]

    def add(self, user: str, answer: str) -> None:
        self.turns += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]

    def reset(self, system: str | None = None) -> None:
        self.turns = []
        if system is not None:
            self.system = system


def chat_loop(sampling: dict, system: str | None = None, console: Console | None = None) -> int:
    console = console or Console()
    conv = Conversation(system)
    with Client(name="moed chat") as client:
        console.print(f"[bold]moed chat[/] with {client.model}. {HELP}")
        while True:
            try:
                line = console.input("[bold green]> [/]").strip()
            except (EOFError, KeyboardInterrupt):
                break
            if not line:
                continue
            if line in ("/exit", "/quit"):
                break
            if line == "/stats":
                console.print(ps_view(client.status()))
            elif line == "/reset":
                conv.reset()
                console.print("[dim]conversation reset[/]")
            elif line.startswith("/system"):
                conv.reset(line[len("/system"):].strip() or None)
                console.print("[dim]system prompt set, conversation reset[/]")
            elif line.startswith("/"):
                console.print(f"[red]unknown command[/] {line}. {HELP}")
            else:
                answer = _turn(client, conv.messages(line), sampling, console)
                if answer is not None:
                    conv.add(line, answer)
    return 0


def _turn(client: Client, messages: list[dict], sampling: dict, console: Console) -> str | None:
    text, fin = "", None
    try:
        with Live(Markdown(""), console=console, refresh_per_second=8, vertical_overflow="visible") as live:
            for ev in client.chat(messages, **sampling):
                if isinstance(ev, Finished):
                    fin = ev
                else:
                    text += ev.text
                    live.update(Markdown(text))
    except RequestRejected as e:
        console.print(f"[red]{e}[/]")
        return None
    except KeyboardInterrupt:
        console.print("[dim](interrupted)[/]")
        return text
    if fin is not None:
        console.print(f"[dim]{fin.completion_tokens} tokens, {fin.decode_tps:.1f} tok/s, {fin.reason}[/]")
    return text


# ------------------------------------------------------------------------------------------ moed run


def read_prompt(prompt: str | None, stdin=None) -> str:
    """The prompt of `moed run`: the argument; "-" (or none) reads stdin; an argument and piped stdin are
    joined (the instruction first, then the piped text)."""
    stdin = stdin or sys.stdin
    piped = not stdin.isatty()
    if prompt in (None, "-"):
        if not piped and prompt is None:
            raise ValueError("give a PROMPT, or '-' / a pipe to read it from stdin")
        text = stdin.read()
        if not text.strip():
            raise ValueError("the prompt read from stdin is empty")
        return text
    if piped:
        extra = stdin.read()
        if extra.strip():
            return f"{prompt}\n\n{extra}"
    return prompt


def run_request(prompt: str, *, raw: bool = False, system: str | None = None, json_schema: str | None = None,
                sampling: dict | None = None) -> dict:
    """The Generate keywords of one `moed run`: chat (with `system`) by default, `raw` for plain completion,
    `json_schema` (a file) for output constrained to that JSON schema (the daemon's grammar)."""
    kw = dict(sampling or {})
    if raw:
        if system is not None:
            raise ValueError("--system needs the chat template (drop --raw)")
        kw["prompt"] = prompt
    else:
        head = [{"role": "system", "content": system}] if system else []
        kw["messages"] = head + [{"role": "user", "content": prompt}]
    if json_schema is not None:
        try:
            schema = json.loads(Path(json_schema).read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"--json-schema {json_schema}: {e}") from None
        kw["grammar"] = {"type": "json_schema", "schema": schema, "strict": True}
    return kw


def run_once(kw: dict, verbose: bool = False, out=None, err=None) -> int:
    """Stream one answer to `out`; the daemon's refusal goes to `err` (exit status 1)."""
    out, err = out or sys.stdout, err or sys.stderr
    fin = None
    try:
        with Client(name="moed run") as c:
            for ev in c.generate(**kw):
                if isinstance(ev, Finished):
                    fin = ev
                else:
                    out.write(ev.text)
                    out.flush()
    except RequestRejected as e:
        print(f"moed run: {e}", file=err)
        return 1
    out.write("\n")
    if verbose and fin is not None:
        print(f"[moed] {fin.completion_tokens} tokens, {fin.decode_tps:.2f} tok/s, ttft {fin.ttft_s:.2f} s, "
              f"finish: {fin.reason}", file=err)
    return 0
