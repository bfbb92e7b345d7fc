"""The per-video decode watchdog: decord can hang inside C (a `get_batch` that loops
forever on a container that over-reports its frame count), and a thread cannot interrupt
that. So each video is decoded in a forked child that streams its Results through a pipe;
when no segment arrives for ``limit`` seconds the child is killed, the video's remaining
segments fail with the reason, and the worker goes on with its next video.

A fork per video costs milliseconds against seconds-to-minutes of decoding, and a killed
decoder takes its leaked memory with it. GPU decoding runs unguarded (a CUDA context does
not survive a fork); so does ``limit <= 0``.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Iterator
from multiprocessing import Pipe
from pathlib import Path

from ekx.extract.video import Request, Result


def _child(decode: Callable[[], Iterator[Result]], tx) -> None:
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if "torch" in sys.modules:
            # GNU OpenMP is not fork-safe: a parallel region in a child of a process that has
            # used OpenMP waits forever on the parent's (absent) thread team; one thread never
            # enters one (each child decodes one video, so this costs nothing)
            sys.modules["torch"].set_num_threads(1)
        try:  # Linux: die with the worker, even when it is SIGKILLed
            import ctypes

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
        for res in decode():
            tx.send(res)
        tx.send(None)
    except BaseException as e:  # the worker turns it into failed segments
        try:
            tx.send(f"decoder crashed: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}")
        except Exception:
            pass
    finally:
        os._exit(0)


def guarded(
    decode: Callable[[], Iterator[Result]], path: Path, requests: list[Request], limit: float
) -> Iterator[Result]:
    """``decode()``'s Results, or - past ``limit`` seconds without one - failures for the rest."""
    if limit <= 0:
        yield from decode()
        return
    rx, tx = Pipe(duplex=False)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child's coverage is not collected
        rx.close()
        _child(decode, tx)
    tx.close()
    pending = {r.row: None for r in requests}  # ordered: failures come out in request order
    try:
        while pending:
            if not rx.poll(limit):
                reason = (
                    f"decode watchdog: no segment of {path.name} decoded in {limit:g} s; its decoder was "
                    "stopped (a hung decoder; raise --decode-timeout if the video is only slow)"
                )
                break
            try:
                msg = rx.recv()
            except EOFError:
                reason = f"the decoder of {path.name} died (killed, e.g. out of memory)"
                break
            if msg is None:
                return
            if isinstance(msg, str):
                reason = f"{msg} ({path.name})"
                break
            pending.pop(msg.row, None)
            yield msg
        else:
            return
        for row in pending:
            yield Result(row, None, None, reason)
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.waitpid(pid, 0)
        rx.close()
