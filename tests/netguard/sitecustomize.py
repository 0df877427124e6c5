"""Socket guard for tests/test_offline.py: on PYTHONPATH, every Python started refuses and records any attempt
to resolve or reach an address outside loopback (AF_UNIX sockets are local too). Attempts go, one a line, to
the file named by $TLEARN_NETGUARD_LOG."""
import os
import socket

_LOG = os.environ.get("TLEARN_NETGUARD_LOG")
_LOCAL_NAMES = {None, "", "localhost", "localhost.localdomain", "::1", "0.0.0.0"}


def _local(host) -> bool:
    host = host.decode() if isinstance(host, bytes) else host
    return host in _LOCAL_NAMES or str(host).startswith("127.")


def _refuse(what: str, target) -> None:
    if _LOG:
        with open(_LOG, "a", encoding="utf-8") as log:
            log.write(f"{what} {target!r} pid {os.getpid()}\n")
    raise OSError(101, f"tlearn test guard: no outbound connection ({what} {target!r})")


def _guarded(method):
    def guarded(self, address, *args):
        if self.family in (socket.AF_INET, socket.AF_INET6) and not _local(address[0]):
            _refuse(method.__name__, address)
        return method(self, address, *args)
    return guarded


def _guarded_sendto(method):
    def sendto(self, data, *args):
        address = args[-1]
        if self.family in (socket.AF_INET, socket.AF_INET6) and not _local(address[0]):
            _refuse("sendto", address)
        return method(self, data, *args)
    return sendto


def _guarded_getaddrinfo(function):
    def getaddrinfo(host, *args, **kwargs):
        if not _local(host):
            _refuse("resolve", host)
        return function(host, *args, **kwargs)
    return getaddrinfo


if _LOG:
    socket.socket.connect = _guarded(socket.socket.connect)
    socket.socket.connect_ex = _guarded(socket.socket.connect_ex)
    socket.socket.sendto = _guarded_sendto(socket.socket.sendto)
    socket.getaddrinfo = _guarded_getaddrinfo(socket.getaddrinfo)
