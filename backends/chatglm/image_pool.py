"""GLM-4V's images decoded in helper processes, never in a worker's event loop: Pillow takes seconds of
CPU on some files within MAX_IMAGE_PIXELS (a PNG of 16,000,000 x 1 pixels), which in the loop would
freeze every other request of the worker, /health too.

A worker keeps at most HELPERS helper processes (``python -m backends.chatglm.image_pool MEMORY``), each
started when first needed and kept for the next image. A helper decodes one image at a time
(backends/chatglm/images.py) in an address space bounded by RLIMIT_AS (a base, plus so much a pixel of
MAX_IMAGE_PIXELS), so a decode that wants more fails there, not in the machine. The worker waits
for its answer on a socket, which under gevent yields to the worker's other requests; a decode that
passes its time bound is killed with its helper and the request gets a 400 (a new helper is started
for the next image). A request waits for a free helper as long as it may wait in the engine's line.

One line of JSON each way: the helper says {"ready": true} once started; then for each image the
worker sends {"data", "size", "max_pixels"} and the helper answers {"pixels"} (the size x size RGB
pixels, base64) or {"error", "message"} (InvalidImage or ImageTooLarge).
"""

from __future__ import annotations

import logging
import os
import resource
import signal
import socket
import subprocess  # nosec B404: our own interpreter and module, no shell
import sys
import threading
import time
from pathlib import Path
from typing import Any

from backends.base import BackendError, ImageInput, ImageTooLarge, InvalidImage, QueueTimeout, Unavailable
from backends.chatglm.engine.protocol import BadMessage, decode, encode, read_line
from backends.chatglm.images import decode_image

log = logging.getLogger("aigate")

HELPERS = 2  # per worker: the engine's line bounds how many requests are decoding at once anyway
MEMORY_BASE = 128 * 1024 * 1024  # Python, Pillow and the image file (a helper starts at about 30 MB)
MEMORY_PER_PIXEL = 64  # the decoded image, its RGB copy, and Pillow's resampling weights for a long side
START_SECONDS = 30.0  # a helper imports Pillow; on a loaded machine that may take a while
_PROJECT = Path(__file__).resolve().parents[2]  # the checkout: where `python -m backends.chatglm.image_pool` resolves
# What a helper needs of the worker's environment (not its keys: the file it decodes is anyone's).
_ENVIRONMENT = frozenset({"PATH", "PYTHONPATH", "LANG", "LC_ALL", "TMPDIR"})
_ERRORS: dict[str, type[BackendError]] = {"InvalidImage": InvalidImage, "ImageTooLarge": ImageTooLarge}


class ImagePool:
    """The helpers of this process, and how long a decode and a wait for a helper may take."""

    def __init__(self, *, seconds: float, max_pixels: int, wait_seconds: float, helpers: int = HELPERS,
                 memory: int | None = None) -> None:
        self.seconds = seconds
        self.max_pixels = max_pixels
        self.wait_seconds = wait_seconds
        self.helpers = helpers
        self.memory = MEMORY_BASE + MEMORY_PER_PIXEL * max_pixels if memory is None else memory
        self.decoded = 0  # images decoded (answered, well or not) by this process's helpers
        self.killed = 0  # helpers killed for taking too long (or lost)
        self._idle: list[_Helper] = []
        self._running = 0  # helpers started, idle or busy
        self._free = threading.Condition()  # gevent's, once the worker is patched

    def decode(self, image: ImageInput, size: int, param: str) -> str:
        """``image`` (the file as sent, base64) as ``size`` x ``size`` RGB pixels, base64. Raises
        InvalidImage (also when it takes longer than ``seconds``), ImageTooLarge (more pixels than
        ``max_pixels``, or more memory than ``memory``), QueueTimeout (no helper free in time),
        Unavailable (no helper could be started)."""
        helper = self._take()
        kept: _Helper | None = helper  # what goes back to the idle ones: None once it is killed
        try:
            answer = helper.ask({"data": image.data, "size": size, "max_pixels": self.max_pixels}, self.seconds,
                                limit=size * size * 4 + 1024)
        except TimeoutError:
            self._lose(helper, f"a decode took more than {self.seconds:g}s")
            kept = None
            raise InvalidImage(f"Invalid image: the image took too long to decode (more than {self.seconds:g}s, "
                               "IMAGE_DECODE_SECONDS); send a smaller or simpler image.", param=param) from None
        except (OSError, BadMessage) as exc:  # it died: past its memory bound where Python could not say so
            self._lose(helper, f"it failed ({exc})")
            kept = None
            raise ImageTooLarge("The image could not be decoded within this server's bounds (it takes too much "
                                "memory); send a smaller image.", param=param) from None
        finally:
            self._give_back(kept)
        self.decoded += 1
        if "pixels" in answer:
            return str(answer["pixels"])
        raise _ERRORS.get(answer.get("error", ""), InvalidImage)(str(answer.get("message")), param=param)

    def close(self) -> None:
        with self._free:
            idle, self._idle = self._idle, []
            self._running -= len(idle)
        for helper in idle:
            helper.stop()

    def _take(self) -> _Helper:
        deadline = time.monotonic() + self.wait_seconds
        with self._free:
            while True:
                while self._idle:
                    helper = self._idle.pop()
                    if helper.process.poll() is None:
                        return helper
                    helper.sock.close()  # it died while idle (killed from outside): another takes its place
                    self._running -= 1
                if self._running < self.helpers:
                    self._running += 1
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    raise QueueTimeout(f"waited {self.wait_seconds:g}s for an image decoder", retry_after=1)
                self._free.wait(left)
        try:
            return _Helper(self.memory)
        except BaseException:
            self._give_back(None)
            raise

    def _give_back(self, helper: _Helper | None) -> None:
        """``helper`` is free again; None: a helper is gone (its place may start a new one)."""
        with self._free:
            if helper is None:
                self._running -= 1
            else:
                self._idle.append(helper)
            self._free.notify()

    def _lose(self, helper: _Helper, why: str) -> None:
        self.killed += 1
        log.warning("image decoder (pid %d) killed: %s", helper.process.pid, why)
        helper.stop()


class _Helper:
    """One helper process and the socket to it, ready when constructed."""

    def __init__(self, memory: int) -> None:
        ours, theirs = socket.socketpair()
        try:
            self.process = subprocess.Popen(  # nosec B603: our own interpreter and module
                [sys.executable, "-m", "backends.chatglm.image_pool", str(memory)], cwd=_PROJECT, stdin=theirs.fileno(),
                stdout=subprocess.DEVNULL, env={k: v for k, v in os.environ.items() if k in _ENVIRONMENT})
        except OSError as exc:
            ours.close()
            raise Unavailable(f"an image decoder could not be started ({exc.strerror})", retry_after=2) from None
        finally:
            theirs.close()
        self.sock = ours
        try:
            ready = decode(read_line(ours, 1024, START_SECONDS) or b"{}")
        except (OSError, ValueError):
            ready = {}
        if not ready.get("ready"):
            self.stop()
            raise Unavailable("an image decoder did not start", retry_after=2)

    def ask(self, message: dict[str, Any], seconds: float, limit: int) -> dict[str, Any]:
        """The helper's answer to ``message``. Raises TimeoutError past ``seconds``, OSError or
        BadMessage when it died or answered nonsense."""
        self.sock.settimeout(seconds)
        self.sock.sendall(encode(message))
        line = read_line(self.sock, limit, seconds)
        if not line:
            raise ConnectionResetError("the decoder exited")
        return decode(line)

    def stop(self) -> None:
        self.sock.close()
        self.process.kill()
        self.process.wait()  # cooperative under gevent; a killed process is reaped at once


def serve(memory: int) -> None:
    """A helper's life: decode the images its worker sends (fd 0 is the socket to it) until it goes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a ^C for the server's group: the worker says when to go
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    with socket.socket(fileno=os.dup(0)) as sock:
        os.close(0)
        sock.sendall(encode({"ready": True}))
        lines = sock.makefile("rb")
        for line in lines:  # unbounded: the worker that started this is trusted
            sock.sendall(encode(_answer(decode(line))))


def _answer(message: dict[str, Any]) -> dict[str, Any]:
    try:
        pixels = decode_image(ImageInput(message["data"]), message["size"], message["max_pixels"], "")
    except (InvalidImage, ImageTooLarge) as exc:
        return {"error": type(exc).__name__, "message": exc.message}
    except MemoryError:
        return {"error": "ImageTooLarge", "message": "The image needs more memory to decode than this server allows "
                "(MAX_IMAGE_PIXELS bounds it); send a smaller image."}
    return {"pixels": pixels.data}


if __name__ == "__main__":
    serve(int(sys.argv[1]))
