"""Certificates and keys of a Flower deployment, made with `cryptography` (the library Flower itself uses).

`make_certs(folder, sites, hosts)` writes:
- `ca.crt`, `ca.key`: a private certificate authority (EC P-384, 10 years) that signs the SuperLink's certificate;
  every SuperNode and the `flwr` CLI verify the SuperLink against `ca.crt`.
- `superlink.crt`, `superlink.key`: the SuperLink's TLS certificate for the given host names / IP addresses (one
  certificate serves its Fleet, Control and ServerAppIo APIs).
- `<site>.key`, `<site>.pub`: one EC P-384 key pair per site in OpenSSH format, Flower's SuperNode authentication:
  the SuperLink (started with `--enable-supernode-auth`) lets in only nodes whose public key was registered
  (`flwr supernode register <site>.pub`), and each node signs its requests with its private key.

Private keys are written with mode 0600. Nothing here is our own cryptography: key generation, signing and the
formats are `cryptography`'s.
"""
from __future__ import annotations

import datetime
import ipaddress
import os
import re
from pathlib import Path

CA_CERT, CA_KEY = "ca.crt", "ca.key"
SERVER_CERT, SERVER_KEY = "superlink.crt", "superlink.key"
DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")
SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class CertsError(ValueError):
    """A certificate folder that is missing files, or a bad site / host name."""


def site_key_paths(folder: Path, site: str) -> tuple[Path, Path]:
    """(private key, public key) of a site's node-authentication key pair."""
    return Path(folder) / f"{site}.key", Path(folder) / f"{site}.pub"


def _write(path: Path, data: bytes, private: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    descriptor = os.open(path, flags, 0o600 if private else 0o644)
    with os.fdopen(descriptor, "wb") as out:
        out.write(data)
    if private:
        os.chmod(path, 0o600)


def _name(common_name: str):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fl_crew_reddit"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _alt_names(hosts: list[str]):
    from cryptography import x509

    names = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def make_certs(folder: Path, sites: list[str], hosts: list[str] | None = None, *, days: int = 3650,
               overwrite: bool = False) -> dict[str, Path]:
    """Write the CA, the SuperLink certificate (valid for `hosts` plus localhost) and one key pair per site."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID

    folder = Path(folder)
    bad = [site for site in sites if not SITE_NAME.match(site)]
    if bad:
        raise CertsError(f"site names must be letters, digits, '.', '_' or '-' (at most 64): {bad}")
    if len(set(sites)) != len(sites):
        raise CertsError(f"site names repeat: {sites}")
    if (folder / CA_KEY).exists() and not overwrite:
        raise CertsError(f"{folder / CA_KEY} exists: a new CA would invalidate every certificate it signed "
                         "(pass overwrite=True / --overwrite to replace it)")
    hosts = list(dict.fromkeys([*(hosts or []), *DEFAULT_HOSTS]))
    now = datetime.datetime.now(datetime.UTC)
    not_before, not_after = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = _name("fl_crew_reddit CA")
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(not_before).not_valid_after(not_after)
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                            content_commitment=False, key_encipherment=False, data_encipherment=False,
                                            key_agreement=False, encipher_only=False, decipher_only=False),
                              critical=True)
               .sign(ca_key, hashes.SHA384()))
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (x509.CertificateBuilder().subject_name(_name(hosts[0])).issuer_name(ca_cert.subject)
                   .public_key(server_key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(not_before).not_valid_after(not_after)
                   .add_extension(_alt_names(hosts), critical=False)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                   .sign(ca_key, hashes.SHA384()))
    pem = serialization.Encoding.PEM
    private_pem = dict(encoding=pem, format=serialization.PrivateFormat.PKCS8,
                       encryption_algorithm=serialization.NoEncryption())
    written = {"ca_cert": folder / CA_CERT, "ca_key": folder / CA_KEY,
               "server_cert": folder / SERVER_CERT, "server_key": folder / SERVER_KEY}
    _write(written["ca_key"], ca_key.private_bytes(**private_pem), private=True)
    _write(written["ca_cert"], ca_cert.public_bytes(pem), private=False)
    _write(written["server_key"], server_key.private_bytes(**private_pem), private=True)
    _write(written["server_cert"], server_cert.public_bytes(pem), private=False)
    for site in sites:
        written.update(make_site_key(folder, site))
    return written


def make_site_key(folder: Path, site: str) -> dict[str, Path]:
    """One site's node-authentication key pair (EC P-384, OpenSSH format: what flower-supernode and
    `flwr supernode register` read)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    if not SITE_NAME.match(site):
        raise CertsError(f"bad site name {site!r}: letters, digits, '.', '_' or '-'")
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = site_key_paths(folder, site)
    _write(private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                      serialization.NoEncryption()), private=True)
    _write(public, key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                 serialization.PublicFormat.OpenSSH) + b"\n", private=False)
    return {f"{site}_key": private, f"{site}_pub": public}


def check_certs(folder: Path, *, server: bool = False, site: str | None = None) -> None:
    """The files a SuperLink (server=True), a site or the submitting CLI needs are present: one clear error if not."""
    folder = Path(folder)
    needed = [folder / CA_CERT]
    if server:
        needed += [folder / SERVER_CERT, folder / SERVER_KEY]
    if site:
        needed.append(site_key_paths(folder, site)[0])
    missing = [str(path) for path in needed if not path.is_file()]
    if missing:
        raise CertsError(f"missing in the certificate folder {folder}: {', '.join(missing)} "
                         "(make them with `python -m fl_crew_reddit.main certs --out FOLDER --sites ...`)")


def registered_sites(folder: Path) -> list[str]:
    """Sites whose public keys are in the folder (`<site>.pub`), in name order."""
    return sorted(path.stem for path in Path(folder).glob("*.pub"))
