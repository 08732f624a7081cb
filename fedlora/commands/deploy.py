"""Helpers for running fedlora on Flower's deployment engine (a SuperLink and SuperNodes on real
machines): TLS certificates and SuperNode authentication keys, the federation entry of
``$FLWR_HOME/config.toml``, and a pre-flight check of a node's config and data.

    fedlora deploy certs OUT_DIR --host superlink.example.org --host 10.0.0.5 --node site-a --node site-b
    fedlora deploy federation NAME --address superlink.example.org:8000 --root-certificates OUT_DIR/ca.crt
    fedlora deploy check-node 'partition-id=0 num-partitions=3 lora-rank=8' [--app .] [--run-config '…']

What Flower 1.41 expects (read from its source):

* the SuperLink serves the Fleet, Control and Runtime APIs over HTTPS on one port (default 8000)
  and takes ``--ssl-ca-certfile/--ssl-certfile/--ssl-keyfile`` (PEM);
* a SuperNode verifies that certificate with ``--root-certificates ca.crt``, so the server
  certificate must name (SAN) every host name / IP address the nodes and ``flwr`` dial;
* ``flower-supernode --auth-supernode-private-key`` loads an OpenSSH-format EC private key and
  ``flwr supernode register`` an OpenSSH-format EC public key on a NIST curve (here P-384);
* ``$FLWR_HOME/config.toml`` names connections ``[superlink.NAME]`` with ``address`` and an
  absolute ``root-certificates`` path (or ``insecure = true``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CURVE_NAME = "secp384r1"


class DeployError(ValueError):
    """A deployment helper was given something it cannot use (the message says what to fix)."""


# ---------------------------------------------------------------------------------------------
# certificates and keys


def _ec_key():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP384R1())


def _write(path: Path, data: bytes, private: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if private:  # create with 0600 so the key is never readable by others, not even briefly
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(path, 0o600)
    else:
        path.write_bytes(data)
    return path


def _pem_key(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(common_name: str):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedlora"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def san_entries(hosts: list[str]) -> list:
    """``hosts`` (DNS names and IPv4/IPv6 addresses) → x509 SubjectAlternativeName entries."""
    from cryptography import x509

    if not hosts:
        raise DeployError("give at least one --host (the name or IP address nodes use to reach the SuperLink)")
    out = []
    for host in hosts:
        host = host.strip()
        if not host or ":" in host and not _is_ip(host) or "/" in host:
            raise DeployError(f"host {host!r} is not a DNS name or IP address (no port, no URL scheme)")
        out.append(x509.IPAddress(ipaddress.ip_address(host)) if _is_ip(host) else x509.DNSName(host))
    return out


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def make_ca(out_dir: str | Path, days: int = 365, common_name: str = "fedlora federation CA") -> tuple[Path, Path]:
    """A self-signed CA; returns (ca.crt, ca.key). Keep ca.key off the SuperLink if you can."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    out = Path(out_dir)
    key = _ec_key()
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(_name(common_name))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA384()))
    return _write(out / "ca.crt", _cert_pem(cert)), _write(out / "ca.key", _pem_key(key), private=True)


def _cert_pem(cert) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)


def _load_ca(ca_cert: str | Path, ca_key: str | Path):
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    for p in (ca_cert, ca_key):
        if not Path(p).is_file():
            raise DeployError(f"{p} not found; create the CA first (fedlora deploy certs OUT_DIR …)")
    try:
        cert = x509.load_pem_x509_certificate(Path(ca_cert).read_bytes())
        key = serialization.load_pem_private_key(Path(ca_key).read_bytes(), password=None)
    except ValueError as err:
        raise DeployError(f"cannot read the CA ({ca_cert}, {ca_key}): {err}") from err
    return cert, key


def make_server_cert(out_dir: str | Path, ca_cert: str | Path, ca_key: str | Path, hosts: list[str],
                     days: int = 365) -> tuple[Path, Path]:
    """The SuperLink's TLS certificate signed by the CA, valid for ``hosts``; returns (server.crt, server.key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID

    sans = san_entries(hosts)
    ca, ca_priv = _load_ca(ca_cert, ca_key)
    key = _ec_key()
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(hosts[0])).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_priv.public_key()), critical=False)
            .sign(ca_priv, hashes.SHA384()))
    out = Path(out_dir)
    return _write(out / "server.crt", _cert_pem(cert)), _write(out / "server.key", _pem_key(key), private=True)


_NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def make_node_key(out_dir: str | Path, name: str) -> tuple[Path, Path]:
    """A SuperNode authentication key pair: (NAME.key, NAME.pub), both in OpenSSH format, EC P-384.

    NAME.key goes to the SuperNode (``--auth-supernode-private-key``); NAME.pub is registered on
    the SuperLink with ``flwr supernode register NAME.pub FEDERATION``.
    """
    from cryptography.hazmat.primitives import serialization

    if not _NODE_NAME.match(name):
        raise DeployError(f"node name {name!r}: use letters, digits, '.', '_' or '-' (it becomes a file name)")
    key = _ec_key()
    priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                             serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    out = Path(out_dir)
    return _write(out / f"{name}.key", priv, private=True), _write(out / f"{name}.pub", pub + f" {name}\n".encode())


def generate_certs(out_dir: str | Path, hosts: list[str], nodes: list[str] = (), days: int = 365,
                   overwrite: bool = False) -> dict[str, Any]:
    """CA + SuperLink certificate for ``hosts`` + one auth key pair per node name, under ``out_dir``.

    Refuses to replace an existing CA unless ``overwrite`` (nodes trusting the old CA would break).
    """
    out = Path(out_dir)
    if (out / "ca.crt").exists() and not overwrite:
        raise DeployError(f"{out / 'ca.crt'} exists; pass --overwrite to replace the CA (every node must then "
                          "get the new ca.crt), or use another OUT_DIR")
    if len(set(nodes)) != len(list(nodes)):
        raise DeployError(f"node names must be unique, got {list(nodes)}")
    san_entries(hosts)  # validate before writing anything
    ca_crt, ca_key = make_ca(out, days)
    srv_crt, srv_key = make_server_cert(out, ca_crt, ca_key, hosts, days)
    keys = {n: make_node_key(out / "nodes", n) for n in nodes}
    return {"ca_cert": ca_crt, "ca_key": ca_key, "server_cert": srv_crt, "server_key": srv_key,
            "nodes": {n: {"private": k[0], "public": k[1]} for n, k in keys.items()}}


# ---------------------------------------------------------------------------------------------
# $FLWR_HOME/config.toml


def flwr_home() -> Path:
    """``$FLWR_HOME``, else ``~/.flwr`` (Flower's default)."""
    return Path(os.environ.get("FLWR_HOME") or Path.home() / ".flwr")


def _toml_str(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_federation(name: str, address: str, root_certificates: str | Path | None = None, insecure: bool = False,
                     home: str | Path | None = None, make_default: bool = False) -> Path:
    """Add or replace ``[superlink.NAME]`` in ``$FLWR_HOME/config.toml``; other entries stay as they are.

    ``address`` is the SuperLink's ``host:port`` (one port serves Fleet, Control and Runtime APIs).
    Either ``root_certificates`` (the CA that signed the SuperLink's certificate; stored as an
    absolute path, which Flower requires) or ``insecure=True``.
    """
    if not re.match(r"^[A-Za-z0-9_-]+$", name):
        raise DeployError(f"federation name {name!r}: use letters, digits, '_' or '-'")
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or "://" in address:
        raise DeployError(f"address {address!r} must be host:port, e.g. superlink.example.org:8000 (no https://)")
    if bool(root_certificates) == bool(insecure):
        raise DeployError("give exactly one of --root-certificates CA_CERT (TLS) or --insecure")
    lines = [f"[superlink.{name}]", f"address = {_toml_str(address)}"]
    if root_certificates:
        ca = Path(root_certificates).expanduser().resolve()
        if not ca.is_file():
            raise DeployError(f"root certificate {ca} not found")
        lines.append(f"root-certificates = {_toml_str(str(ca))}")
    else:
        lines.append("insecure = true")
    block = "\n".join(lines) + "\n"

    path = Path(home) if home else flwr_home()
    path.mkdir(parents=True, exist_ok=True)
    path = path / "config.toml"
    text = path.read_text() if path.exists() else ""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise DeployError(f"{path} is not valid TOML ({err}); fix it before adding a federation") from err
    header = re.compile(rf"^\[superlink\.{re.escape(name)}\]\s*$", re.M)
    if name in doc.get("superlink", {}) and (m := header.search(text)):
        nxt = re.compile(r"^\[", re.M).search(text, m.end())
        end = nxt.start() if nxt else len(text)
        text = text[:m.start()] + block + ("\n" if nxt else "") + text[end:]
    elif name in doc.get("superlink", {}):
        raise DeployError(f"{path} defines superlink.{name} in a form this helper cannot edit; edit it by hand")
    else:
        text = (text.rstrip("\n") + "\n\n" if text.strip() else "") + block
    if make_default:
        if "superlink" in doc and "default" in doc["superlink"]:
            text = re.sub(r'^(default\s*=\s*)"[^"]*"', lambda m: m.group(1) + _toml_str(name), text, count=1, flags=re.M)
        elif re.search(r"^\[superlink\]\s*$", text, re.M):
            text = re.sub(r"^\[superlink\]\s*$", f"[superlink]\ndefault = {_toml_str(name)}", text, count=1, flags=re.M)
        else:
            text = f"[superlink]\ndefault = {_toml_str(name)}\n\n" + text
    tomllib.loads(text)  # never leave a broken file behind
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------------------------
# node pre-flight check


@dataclass
class NodeReport:
    partition_id: int
    num_partitions: int
    rank: int
    data: str
    train_rows: int
    eval_rows: int
    columns: list[str]
    device: str | None
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def format(self) -> str:
        lines = [f"node: partition {self.partition_id}/{self.num_partitions}, lora-rank {self.rank}, "
                 f"device {self.device or 'default'}",
                 f"data: {self.data}: {self.train_rows} training rows, {self.eval_rows} held-out rows; "
                 f"columns {', '.join(self.columns)}"]
        lines += [f"note: {n}" for n in self.notes]
        lines += [f"PROBLEM: {p}" for p in self.problems]
        lines.append("ok: this node can join" if not self.problems else "not ok: fix the problems above")
        return "\n".join(lines)


def _parse_kv(text: str, what: str) -> dict[str, Any]:
    """``key=value …`` parsed as Flower parses --node-config / --run-config (TOML values)."""
    from flwr.common.config import parse_config_args

    if not text.strip():
        return {}
    try:
        return parse_config_args([text])
    except Exception as err:  # Flower raises click.ClickException, not ValueError
        raise DeployError(f"cannot parse {what} {text!r}: write key=value pairs separated by spaces, "
                          f'strings in double quotes (data-path="/data/a.jsonl")') from err


def app_run_config(app_dir: str | Path = ".", overrides: str = "") -> dict[str, Any]:
    """The app's ``[tool.flwr.app.config]`` (flattened like Flower does) with ``--run-config`` overrides."""
    from flwr.common.config import flatten_dict

    pyproject = Path(app_dir) / "pyproject.toml"
    if not pyproject.is_file():
        raise DeployError(f"{pyproject} not found; pass --app DIR (the fedlora app folder)")
    table = tomllib.loads(pyproject.read_text()).get("tool", {}).get("flwr", {}).get("app", {}).get("config")
    if table is None:
        raise DeployError(f"{pyproject} has no [tool.flwr.app.config] table")
    run_config = flatten_dict(table)
    extra = _parse_kv(overrides, "--run-config")
    unknown = sorted(set(extra) - set(run_config))
    if unknown:  # Flower refuses these at `flwr run` too
        raise DeployError(f"run config key(s) {unknown} are not in [tool.flwr.app.config] of {pyproject}")
    return run_config | extra


def check_node(node_config: str, app_dir: str | Path = ".", run_config: str = "") -> NodeReport:
    """Parse ``node_config`` (the ``--node-config`` string) as the ClientApp will, against the run
    config, and load the node's data. Raises ConfigError/DataError/DeployError for what would make
    the node fail; returns a report with remaining problems (rank not accepted by the strategy,
    unavailable device) and notes."""
    from fedlora.config import config_from_run_config, node_settings
    from fedlora.data.splits import client_datasets

    cfg = config_from_run_config(app_run_config(app_dir, run_config))
    parsed = _parse_kv(node_config, "node config")
    node = node_settings(parsed, cfg)
    train, held_out = client_datasets(cfg, node.partition_id, node.num_partitions, node.data_path)
    report = NodeReport(node.partition_id, node.num_partitions, node.rank,
                        node.data_path or f"partition {node.partition_id} of {cfg.dataset.path}",
                        len(train), len(held_out), list(train.column_names), node.device)
    if len(train) == 0:
        report.problems.append("no training rows for this node")
    if len(train) < cfg.train.batch_size:
        report.notes.append(f"fewer training rows ({len(train)}) than train.batch_size={cfg.train.batch_size}")
    if node.data_path and len(held_out) >= len(train):
        report.notes.append(f"dataset.eval_size={cfg.dataset.eval_size} holds out {len(held_out)} of this file's "
                            f"{len(train) + len(held_out)} rows; lower it in the run config for small files")
    if node.num_partitions != cfg.num_clients and not node.data_path:
        report.notes.append(f"num-partitions={node.num_partitions} differs from the run's num_clients={cfg.num_clients}")
    from fedlora.aggregation import check_ranks, resolve_method

    method = resolve_method(cfg)
    expected = cfg.client_rank(node.partition_id) if node.num_partitions == cfg.num_clients else cfg.adapter.rank
    try:
        check_ranks(method, [node.rank, expected])
    except ValueError as err:
        report.problems.append(f"lora-rank={node.rank} vs the run's rank {expected}: {err}")
    else:
        if node.rank != expected:
            report.notes.append(f"lora-rank={node.rank} differs from the run's rank {expected} "
                                f"(strategy {method.name} mixes ranks)")
    if node.device and node.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            report.problems.append(f"device={node.device} but torch sees no CUDA device on this machine")
    return report


# ---------------------------------------------------------------------------------------------
# command line


USAGE = """fedlora deploy certs OUT_DIR --host H [--host H …] [--node NAME …] [--days 365] [--overwrite]
fedlora deploy federation NAME --address HOST:PORT (--root-certificates CA_CERT | --insecure) [--default]
fedlora deploy check-node 'partition-id=0 num-partitions=3 lora-rank=8 [data-path=…] [device=…]'
                          [--app DIR] [--run-config 'key=value …']"""


def deploy_main(argv: list[str]) -> None:
    from fedlora.config import ConfigError
    from fedlora.data.records import DataError

    parser = argparse.ArgumentParser(prog="fedlora deploy", description="deployment helpers", usage=USAGE)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("certs", help="CA, SuperLink TLS certificate, SuperNode auth keys")
    p.add_argument("out_dir")
    p.add_argument("--host", action="append", default=[], required=True,
                   help="DNS name or IP address of the SuperLink, as nodes dial it (repeat)")
    p.add_argument("--node", action="append", default=[], help="a SuperNode name: writes nodes/NAME.key|.pub (repeat)")
    p.add_argument("--days", type=int, default=365)
    p.add_argument("--overwrite", action="store_true")
    p = sub.add_parser("federation", help="add/replace [superlink.NAME] in $FLWR_HOME/config.toml")
    p.add_argument("name")
    p.add_argument("--address", required=True)
    p.add_argument("--root-certificates")
    p.add_argument("--insecure", action="store_true")
    p.add_argument("--default", action="store_true", help="make it the default federation")
    p = sub.add_parser("check-node", help="check a SuperNode's node config and data before it joins")
    p.add_argument("node_config")
    p.add_argument("--app", default=".")
    p.add_argument("--run-config", default="")
    args = parser.parse_args(argv)
    try:
        if args.command == "certs":
            out = generate_certs(args.out_dir, args.host, args.node, args.days, args.overwrite)
            print(f"CA:       {out['ca_cert']} (give to every node and flwr user); {out['ca_key']} (keep safe)")
            print(f"SuperLink: --ssl-ca-certfile {out['ca_cert']} --ssl-certfile {out['server_cert']} "
                  f"--ssl-keyfile {out['server_key']}")
            for name, k in out["nodes"].items():
                print(f"node {name}: --auth-supernode-private-key {k['private']}; register {k['public']}")
        elif args.command == "federation":
            path = write_federation(args.name, args.address, args.root_certificates, args.insecure,
                                    make_default=args.default)
            print(f"wrote [superlink.{args.name}] to {path}")
        else:
            report = check_node(args.node_config, args.app, args.run_config)
            print(report.format())
            if report.problems:
                raise SystemExit(1)
    except (DeployError, ConfigError, DataError) as err:
        raise SystemExit(f"fedlora deploy {args.command}: {err}") from None
