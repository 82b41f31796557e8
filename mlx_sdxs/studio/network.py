"""Where the studio can be reached: this machine's names and addresses. A studio on a wildcard address
(`--host 0.0.0.0` or `::`) listens on every interface, so its Guard accepts as Host each of this machine's
addresses and names, and nothing else (any other Host is DNS rebinding); visitors are given its LAN addresses."""

from __future__ import annotations

import ipaddress
import socket

from mlx_sdxs import loopback

#: Bind addresses that mean every interface of this machine.
WILDCARDS = ("0.0.0.0", "::")
DEFAULT_PORTS = {"http": 80, "https": 443}


def is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def interface_addresses() -> list[str]:
    """Every address of this machine's interfaces, IPv4 first. IPv6 link-local ones are left out: a browser's
    URL cannot carry their zone."""
    import psutil

    found = []
    for entries in psutil.net_if_addrs().values():
        for entry in entries:
            if entry.family in (socket.AF_INET, socket.AF_INET6):
                address = ipaddress.ip_address(entry.address.split("%")[0])
                if not (address.version == 6 and address.is_link_local):
                    found.append(address)
    return [str(a) for a in sorted(set(found), key=lambda a: (a.version, a.is_loopback, a))]


def machine_names() -> list[str]:
    """This machine as a browser may name it: the loopback names, the hostname (and its mDNS `.local` name),
    each interface address."""
    hostname = socket.gethostname().lower()
    names = [*loopback.NAMES, hostname, *([] if "." in hostname else [f"{hostname}.local"]), *interface_addresses()]
    return list(dict.fromkeys(names))


def listening_names(bind_host: str) -> list[str]:
    """The names a browser may use for a server bound to `bind_host`."""
    if bind_host in WILDCARDS:
        return machine_names()
    return list(dict.fromkeys([*loopback.NAMES, bind_host.lower()]))


def visitor_addresses(bind_host: str) -> list[str]:
    """What to print for visitors on other devices, best first: the LAN addresses and the `.local` name on a
    wildcard (this machine's loopback address when it has no other), else the address it is bound to."""
    if bind_host not in WILDCARDS:
        return [bind_host]
    outside = [name for name in machine_names() if name not in loopback.NAMES
               and not (is_address(name) and ipaddress.ip_address(name).is_loopback)]
    addresses = [name for name in outside if is_address(name)]
    local = [name for name in outside if name.endswith(".local")]
    return [*addresses, *local] or [loopback.HOST]


def authority(name: str, port: int | None = None) -> str:
    """`name[:port]` as a URL or a Host header writes it (an IPv6 address in brackets)."""
    host = f"[{name}]" if ":" in name else name
    return host if port is None else f"{host}:{port}"


def host_headers(bind_host: str, port: int, scheme: str) -> set[str]:
    """Every Host header a browser sends for this server (without the port when it is the scheme's default)."""
    names = listening_names(bind_host)
    headers = {authority(name, port) for name in names}
    if DEFAULT_PORTS[scheme] == port:
        headers |= {authority(name) for name in names}
    return headers
