# TLS material and credentials of the secure services (OBF_SECURITY=tls,
# docs/security.md). Sourced by redis.sh and postgres.sh after env.sh.
#
#   $OBF_TLS_DIR      ca.crt/ca.key, server.crt/server.key (127.0.0.1, localhost),
#                     client.crt/client.key: made once by openssl, kept between runs
#   $OBF_SECRETS_DIR  one generated password per file (0600), and the libpq
#                     passfile `pgpass`; nothing here is ever passed on a command line

ensure_openssl() { command -v openssl >/dev/null || apt_install openssl; }

# tls_material: a private CA, a server certificate for 127.0.0.1/localhost and
# a client certificate, all signed by it (10 years: a local test CA).
tls_material() {
  ensure_openssl
  local d="$OBF_TLS_DIR"
  [ -s "$d/ca.crt" ] && [ -s "$d/server.crt" ] && [ -s "$d/client.crt" ] && return 0
  log "TLS: generating a CA and server/client certificates in $d"
  mkdir -p "$d" && chmod 700 "$d"
  (
    set -e
    cd "$d"
    umask 077
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=onboardflow local CA" \
      -keyout ca.key -out ca.crt 2>/dev/null
    for who in server client; do
      openssl req -newkey rsa:2048 -nodes -subj "/CN=onboardflow-$who" \
        -keyout "$who.key" -out "$who.csr" 2>/dev/null
      printf 'subjectAltName=IP:127.0.0.1,IP:::1,DNS:localhost\nextendedKeyUsage=%s\n' \
        "$([ "$who" = server ] && echo serverAuth || echo clientAuth)" >"$who.ext"
      openssl x509 -req -in "$who.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
        -extfile "$who.ext" -out "$who.crt" 2>/dev/null
      rm -f "$who.csr" "$who.ext"
    done
    chmod 644 ca.crt server.crt client.crt
  ) || die "openssl could not make the TLS material in $d"
}

# secret NAME: the password in $OBF_SECRETS_DIR/NAME, generated on first use
# (48 hex characters from openssl's CSPRNG). Prints the file's path.
secret() {
  local f="$OBF_SECRETS_DIR/$1"
  if [ ! -s "$f" ]; then
    ensure_openssl
    mkdir -p "$OBF_SECRETS_DIR" && chmod 700 "$OBF_SECRETS_DIR"
    # No trailing newline: some clients read the file whole (the Flink job's
    # Kafka client, through Kafka's DirectoryConfigProvider).
    (umask 077; openssl rand -hex 24 | tr -d '\n' >"$f")
  fi
  echo "$f"
}

# sha256_of FILE: the SHA-256 of the first line of FILE (Redis ACL files take
# `#<sha256>` instead of the password itself).
sha256_of() { head -n1 "$1" | tr -d '\n' | openssl dgst -sha256 -r | cut -d' ' -f1; }
