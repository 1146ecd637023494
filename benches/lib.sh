# Shared by the shell benchmarks (load, memory, tls): nginx configurations and the policy
# they all measure. Source it after setting W (the run's work directory).

# An nginx configuration: NGINX_WORKERS workers (default 1), no access log, sendfile; `$2`
# is the server block(s).
nginx_conf() {  # name, server block
  cat <<CONF
pid $W/run/$1.pid;
error_log $W/logs/$1.error.log warn;
worker_processes ${NGINX_WORKERS:-1};
worker_rlimit_nofile 16384;
events { worker_connections 8192; }
http {
    access_log off;
    sendfile on; tcp_nodelay on;
    keepalive_timeout 65s; keepalive_requests 1000000;
    client_body_temp_path $W/run/$1-body; proxy_temp_path $W/run/$1-proxy;
    fastcgi_temp_path $W/run/$1-fcgi; uwsgi_temp_path $W/run/$1-uwsgi; scgi_temp_path $W/run/$1-scgi;
    default_type application/octet-stream;
    $2
}
CONF
}

# The location block of nginx as a plain reverse proxy to the upstream `store`.
NGINX_PROXY_LOCATION='location / {
            proxy_pass http://store; proxy_http_version 1.1; proxy_set_header Connection "";
            proxy_set_header Host $host; proxy_buffering on; proxy_request_buffering off;
        }'

# The case every benchmark measures: a foreign third party (wrk from 127.0.0.1, US) reads a
# resident dataset of the domestic store (127.0.0.2, CN) under a valid explicit consent, so
# that the policy, the consent check and the decision log all run. Writes the consent file
# and prints the policy.
bench_policy() {  # name, listen port, store port, log file, extra [proxy] lines, extra tables
  cat > "$W/consents.jsonl" <<JSON
{"id":"c-bench-1","subject":"u1","recipient":"bureau","purposes":["credit_scoring"],"categories":["user.financial"],"destinations":["US"],"method":"explicit","granted_at":"2026-01-01T00:00:00Z","expires_at":"2036-01-01T00:00:00Z"}
JSON
  cat <<TOML
[policy]
name = "$1"
home = "CN"
[proxy]
listen = "127.0.0.1:$2"
${5:-}
[[networks]]
cidr = "127.0.0.2/32"
country = "CN"
[[networks]]
cidr = "127.0.0.1/32"
country = "US"
[[upstreams]]
name = "store"
url = "http://127.0.0.2:$3"
[[recipients]]
id = "bureau"
relation = "third_party"
country = "US"
networks = ["127.0.0.1/32"]
[[datasets]]
name = "payments"
match = { path_prefix = "/payments/" }
upstream = "store"
category = "user.financial"
subject = { path_segment = 2 }
cross_border = "consent"
third_party = "consent"
[consent]
store = "file:$W/consents.jsonl"
[admin]
listen = "127.0.0.1:0"
[log]
path = "$4"
signing_key = "$W/log-signing.key"
${6:-}
TOML
}
