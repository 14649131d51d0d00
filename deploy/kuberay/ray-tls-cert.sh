#!/bin/sh
# Makes this pod's Ray TLS key and certificate, signed by the cluster's CA, before Ray starts
# (the RayService runs it as each pod's first init container).
#
# Why one certificate per pod: Ray's gRPC clients check the server's certificate against the
# address they dial, which is a pod IP (raylets, workers, the object manager) or the head
# service's DNS name (a worker joining), so a single certificate shared by every pod would not
# verify. The CA key stays in this init container; the Ray container only sees OUT_DIR.
#
# In:  CA_DIR/ca.crt and CA_DIR/ca.key (the Secret), OUT_DIR (an emptyDir), POD_IP, POD_NAMESPACE,
#      optionally CLUSTER_DOMAIN (cluster.local) and CERT_DAYS (365).
# Out: OUT_DIR/tls.key, OUT_DIR/tls.crt, OUT_DIR/ca.crt.
set -eu

: "${CA_DIR:?}" "${OUT_DIR:?}" "${POD_IP:?}" "${POD_NAMESPACE:?}"
domain="${CLUSTER_DOMAIN:-cluster.local}"
days="${CERT_DAYS:-365}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
umask 077

# 127.0.0.1/localhost: processes of the pod reach each other there; the wildcards cover the
# head service (<cluster>-head-svc.<namespace>.svc...) whose name carries a generated suffix.
cat > "$work/ext.cnf" <<EOF
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth, clientAuth
subjectAltName = IP:$POD_IP, IP:127.0.0.1, DNS:localhost, DNS:*.$POD_NAMESPACE.svc, DNS:*.$POD_NAMESPACE.svc.$domain
EOF

openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "/CN=ray-$POD_IP" \
    -keyout "$work/tls.key" -out "$work/tls.csr" 2>/dev/null
# A random serial instead of -CAcreateserial, which would write next to the read-only CA.
openssl x509 -req -in "$work/tls.csr" -CA "$CA_DIR/ca.crt" -CAkey "$CA_DIR/ca.key" \
    -set_serial "0x$(openssl rand -hex 16)" -days "$days" -sha256 -extfile "$work/ext.cnf" \
    -out "$work/tls.crt" 2>/dev/null
openssl verify -CAfile "$CA_DIR/ca.crt" "$work/tls.crt" >/dev/null

mkdir -p "$OUT_DIR"
cp "$work/tls.key" "$work/tls.crt" "$OUT_DIR/"
cp "$CA_DIR/ca.crt" "$OUT_DIR/ca.crt"
chmod 0600 "$OUT_DIR/tls.key"
chmod 0644 "$OUT_DIR/tls.crt" "$OUT_DIR/ca.crt"
