"""`moed chat`: an interactive chat with the running daemon, rendered as markdown.

Commands: /stats (the daemon's figures), /reset (forget the conversation), /system TEXT (set the
system prompt and reset), /exit.
"""

from __future__ import annotations

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
