"""Where the engine listens, and who may be at the other end of its socket.

On a machine shared with other Unix users (shared hosting), another user must neither reach the
engine nor stand in for it. So its socket is a path in a directory that is aigate's user's own and
closed to everyone else (0700), made here if missing and refused if anyone else could have put
something in it; and both ends ask the kernel who the peer is (SO_PEERCRED): the engine serves only
its own user, a worker talks only to a process of its own user.

An abstract address (``@name``, Linux) has no owner and no mode: the peer checks still keep other
users from using or impersonating the engine, but any user may take the name while the engine is
down (a crash, a restart, the idle exit) and so keep it from starting.
"""

from __future__ import annotations

import os
import socket
import stat
import struct

ADDRESS_TAKEN = 3  # the engine's exit status: another engine already serves this address
SUN_PATH_MAX = 107  # a Unix socket's path, in bytes (sun_path holds 108 with the final NUL)

_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class UnsafeAddress(OSError):
    """The socket's directory is not aigate's user's own, or the address cannot be used."""


class ForeignPeer(ConnectionRefusedError):
    """The process at the other end belongs to another user."""

    def __init__(self, address: str, pid: int, uid: int) -> None:
        super().__init__(f"the local engine's address {address} is held by process {pid} of uid {uid}, not by "
                         f"aigate's user (uid {os.getuid()}): nothing is sent to it")
        self.pid, self.uid = pid, uid


def is_abstract(address: str) -> bool:
    return address.startswith("@")


def sockaddr(address: str) -> str:
    """What bind() and connect() take: an abstract name starts with a NUL byte."""
    return "\0" + address[1:] if is_abstract(address) else address


def peer(sock: socket.socket) -> tuple[int, int]:
    """The (pid, uid) of the process at the other end of a connected Unix socket (the kernel's
    word: what that process was when it connected, or listened)."""
    pid, uid, _ = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return pid, uid


def check_peer(sock: socket.socket, address: str) -> None:
    """Raises ForeignPeer unless the other end is a process of this user."""
    pid, uid = peer(sock)
    if uid != os.getuid():
        raise ForeignPeer(address, pid, uid)


def problem(address: str) -> str | None:
    """Why the engine could not safely listen at ``address``, or None. Reads only (the start-up
    check): a missing directory is fine, the engine makes it."""
    if len(os.fsencode(sockaddr(address))) > SUN_PATH_MAX:
        return (f"{address} is longer than the {SUN_PATH_MAX} bytes a Unix socket's address may have; "
                "set ENGINE_SOCKET to a shorter path")
    if is_abstract(address):
        return None
    directory = os.path.dirname(os.path.abspath(address))
    try:
        return _directory_problem(directory, os.lstat(directory))
    except FileNotFoundError:
        return None


def private_directory(address: str) -> None:
    """Make the directory of a path ``address`` (0700) if missing; raise UnsafeAddress unless it is
    this user's own, closed to everyone else, and not a symbolic link."""
    directory = os.path.dirname(os.path.abspath(address))
    try:
        os.mkdir(directory, 0o700)
    except FileExistsError:
        pass
    found = _directory_problem(directory, os.lstat(directory))
    if found:
        raise UnsafeAddress(found)


def _directory_problem(directory: str, st: os.stat_result) -> str | None:
    if stat.S_ISLNK(st.st_mode):
        why = "is a symbolic link"
    elif not stat.S_ISDIR(st.st_mode):
        why = "is not a directory"
    elif st.st_uid != os.getuid():
        why = f"belongs to uid {st.st_uid}, not to aigate's user (uid {os.getuid()})"
    elif st.st_mode & 0o077:
        why = f"is open to other users (mode {stat.S_IMODE(st.st_mode):o}; it must be 700)"
    else:
        return None
    return (f"the engine's socket directory {directory} {why}; remove it, or set ENGINE_SOCKET to a path in a "
            "directory only aigate's user can enter")
