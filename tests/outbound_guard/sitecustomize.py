"""Loaded into `python app.py` by tests/test_security_round3.py (through PYTHONPATH): every connection to, and
every name lookup of, anything but a loopback address is written to $OUTBOUND_LOG and refused, so a test sees
an outbound attempt without any traffic leaving the machine."""

import ipaddress
import os
import sys

_LOG = os.environ.get("OUTBOUND_LOG")


def _loopback(host) -> bool:
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    if host in (None, "", "localhost"):
        return True
    try:
        return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
    except ValueError:
        return False


def _guard(event: str, args: tuple) -> None:
    if event == "socket.connect" and isinstance(args[1], tuple):
        host = args[1][0]
    elif event == "socket.getaddrinfo":
        host = args[0]
    else:
        return
    if not _loopback(host):
        with open(_LOG, "a") as log:
            log.write(f"{event} {host!r}\n")
        raise OSError(f"outbound connection to {host!r} refused by the test guard")


if _LOG:
    sys.addaudithook(_guard)
