{{/*
Checks that fail the install with a clear message instead of a RayService that
never becomes ready. Called once from rayservice.yaml.
*/}}
{{- define "bark-serve.validate" -}}
{{- $v := .Values -}}
{{- $envName := "^[A-Za-z_][A-Za-z0-9_]*$" -}}
{{- range $what, $name := dict "bark.orchestrator.api_keys_env" $v.bark.orchestrator.api_keys_env "bark.batch.redis_password_env" $v.bark.batch.redis_password_env "bark.batch.redis_url_env" $v.bark.batch.redis_url_env -}}
{{- if and $name (not (regexMatch $envName $name)) -}}
{{- fail (printf "%s=%q is not a valid environment variable name" $what $name) -}}
{{- end -}}
{{- end -}}

{{- /* Ports Ray itself listens on in KubeRay pods (head rayStartParams may move them): Serve's proxy cannot share one. */ -}}
{{- $rayPorts := dict "port" (list 6379 "the GCS port") "dashboard-port" (list 8265 "the dashboard port") "ray-client-server-port" (list 10001 "the Ray Client port") "metrics-export-port" (list 8080 "Ray's metrics export port") "dashboard-agent-listen-port" (list 52365 "the dashboard agent's port") -}}
{{- range $param, $port := $rayPorts -}}
{{- $num := index $port 0 -}}
{{- if hasKey $v.head.rayStartParams $param }}{{ $num = index $v.head.rayStartParams $param }}{{ end -}}
{{- if eq (toString $num) (toString $v.bark.http_port) -}}
{{- fail (printf "bark.http_port=%v collides with %s in KubeRay's Ray pods (%s %v): pick another bark.http_port, e.g. 8000" $v.bark.http_port (index $port 1) $param $num) -}}
{{- end -}}
{{- end -}}

{{- /* Pools: each one in use needs a worker group definition with a DNS-label name. */ -}}
{{- $args := include "bark-serve.barkArgs" . | fromYaml -}}
{{- range $pool := (include "bark-serve.poolsInUse" . | fromYaml).pools -}}
{{- if not (regexMatch "^[a-z]([-a-z0-9]{0,38}[a-z0-9])?$" $pool) -}}
{{- fail (printf "pool %q: pool names become worker group names and must be DNS labels (a-z, 0-9, '-', at most 40 characters)" $pool) -}}
{{- end -}}
{{- if not (kindIs "map" (get $v.pools $pool)) -}}
{{- fail (printf "the bark block places deployments on pool %q, but pools.%s is not defined (add it, e.g. pools: {%s: {gpu: {count: 1}}})" $pool $pool $pool) -}}
{{- end -}}
{{- $cfg := include "bark-serve.overlay" (list $v.poolDefaults (get $v.pools $pool)) | fromYaml -}}
{{- if not (and (le (int $cfg.minReplicas) (int $cfg.replicas)) (le (int $cfg.replicas) (int $cfg.maxReplicas))) -}}
{{- fail (printf "pools.%s: need minReplicas <= replicas <= maxReplicas" $pool) -}}
{{- end -}}
{{- if lt (int $cfg.resourceUnits) 1 -}}
{{- fail (printf "pools.%s.resourceUnits must be >= 1" $pool) -}}
{{- end -}}
{{- /* Containers ask for whole GPUs (a limit of 0.5 would be cut to 0), and ray start gets num-gpus from this count. */ -}}
{{- if or (lt (float64 $cfg.gpu.count) 0.0) (ne (float64 $cfg.gpu.count) (float64 (int64 $cfg.gpu.count))) -}}
{{- fail (printf "pools.%s.gpu.count=%v: a pod can only ask for a whole number of GPUs (%s); share GPUs with fractional num_gpus of the deployments instead" $pool $cfg.gpu.count $cfg.gpu.resourceName) -}}
{{- end -}}
{{- end -}}
{{- /*
Capacity: a pool's pods, all up (maxReplicas), hold maxReplicas x gpu.count GPUs and maxReplicas x
resourceUnits replicas; the most replicas its deployments may have (num_replicas, or autoscaling.max_replicas)
must fit. GPUs are summed in thousandths, so that 0.3 + 0.3 + 0.3 + 0.1 is exactly 1.
*/ -}}
{{- $gpuNeed := dict -}}{{- $unitNeed := dict -}}{{- $users := dict -}}
{{- range $dep, $path := include "bark-serve.placementPaths" . | fromYaml -}}
{{- $p := $args -}}
{{- range $path }}{{ $p = get $p . }}{{ end -}}
{{- $active := or (not (has $dep (list "BatchWorker" "VoiceEncoder"))) (and (eq $dep "BatchWorker") $args.batch.enabled) (and (eq $dep "VoiceEncoder") $args.voice_cloning.enabled) -}}
{{- if and $p.pool $p.num_gpus (kindIs "map" (get $v.pools $p.pool)) -}}
{{- $cfg := include "bark-serve.overlay" (list $v.poolDefaults (get $v.pools $p.pool)) | fromYaml -}}
{{- if gt (float64 $p.num_gpus) (float64 $cfg.gpu.count) -}}
{{- fail (printf "%s asks for num_gpus=%v but pools.%s.gpu.count is %v: its replicas could never be placed" $dep $p.num_gpus $p.pool $cfg.gpu.count) -}}
{{- end -}}
{{- end -}}
{{- if and $active $p.pool -}}
{{- $n := int $p.num_replicas -}}
{{- if kindIs "map" $p.autoscaling }}{{ $n = int $p.autoscaling.max_replicas }}{{ end -}}
{{- $milli := int64 (round (mulf (float64 (default 0 $p.num_gpus)) 1000) 0) -}}
{{- $_ := set $gpuNeed $p.pool (add (default 0 (get $gpuNeed $p.pool)) (mul $n $milli)) -}}
{{- $_ := set $unitNeed $p.pool (add (default 0 (get $unitNeed $p.pool)) $n) -}}
{{- $_ := set $users $p.pool (append (default (list) (get $users $p.pool)) (printf "%s (%d replicas x num_gpus %v)" $dep $n (default 0 $p.num_gpus))) -}}
{{- end -}}
{{- end -}}
{{- range $pool, $milli := $gpuNeed -}}
{{- if kindIs "map" (get $v.pools $pool) -}}
{{- $cfg := include "bark-serve.overlay" (list $v.poolDefaults (get $v.pools $pool)) | fromYaml -}}
{{- $max := int64 $cfg.maxReplicas -}}
{{- if gt (int64 $milli) (mul $max (int64 $cfg.gpu.count) 1000) -}}
{{- fail (printf "pool %s cannot hold its replicas: up to %v GPUs for %s, but pools.%s has maxReplicas (%d) x gpu.count (%v) = %d: raise pools.%s.maxReplicas (or gpu.count), or lower num_replicas / autoscaling.max_replicas" $pool (divf $milli 1000) (join ", " (get $users $pool)) $pool $max $cfg.gpu.count (mul $max (int64 $cfg.gpu.count)) $pool) -}}
{{- end -}}
{{- if gt (int64 (get $unitNeed $pool)) (mul $max (int64 $cfg.resourceUnits)) -}}
{{- fail (printf "pool %s cannot hold its replicas: up to %d replicas for %s, but pools.%s has maxReplicas (%d) x resourceUnits (%d) = %d (one unit per replica): raise pools.%s.maxReplicas (or resourceUnits), or lower num_replicas / autoscaling.max_replicas" $pool (get $unitNeed $pool) (join ", " (get $users $pool)) $pool $max (int $cfg.resourceUnits) (mul $max (int64 $cfg.resourceUnits)) $pool) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- /* Redis. */ -}}
{{- if and $v.bark.batch.enabled (not (or $v.bark.batch.redis_url $v.bark.batch.redis_url_env)) -}}
{{- fail (printf "bark.batch.enabled needs bark.batch.redis_url, or bark.batch.redis_url_env naming an env var (extraEnv) that holds the URL (in-chart Redis: redis://%s:6379/0 with redis.internal.enabled=true)" (include "bark-serve.redisName" .)) -}}
{{- end -}}
{{- with include "bark-serve.appRedisHostNeedingAuth" . -}}
{{- if and $v.redis.auth.enabled (not $v.bark.batch.redis_password_env) -}}
{{- fail (printf "bark.batch.redis_url points at %s, which asks for a password (redis.auth.enabled), but bark.batch.redis_password_env is null: replicas could not authenticate (NOAUTH); set bark.batch.redis_password_env=BARK_REDIS_PASSWORD (the chart fills it from the redis.auth Secret), or redis.auth.enabled=false" .) -}}
{{- end -}}
{{- end -}}
{{- if and $v.bark.batch.redis_password_env (not $v.redis.auth.enabled) -}}
{{- fail "bark.batch.redis_password_env is set but redis.auth.enabled is false: there is no password to put in it" -}}
{{- end -}}
{{- if $v.gcsFaultTolerance.enabled -}}
{{- if not (include "bark-serve.gcsRedisAddress" .) -}}
{{- fail "gcsFaultTolerance.enabled needs a Redis: gcsFaultTolerance.redisAddress, redis.external.address or redis.internal.enabled" -}}
{{- end -}}
{{- if has $v.bark.batch.redis_password_env (list "REDIS_PASSWORD" "RAY_REDIS_ADDRESS" "REDIS_USERNAME") -}}
{{- fail (printf "bark.batch.redis_password_env=%s: KubeRay rejects this env var on the head when GCS fault tolerance is on; use e.g. BARK_REDIS_PASSWORD" $v.bark.batch.redis_password_env) -}}
{{- end -}}
{{- end -}}
{{- /* Without the in-chart Redis a chart-made Secret would hold a random password no Redis knows. */ -}}
{{- if and (include "bark-serve.redisUsed" .) $v.redis.auth.enabled (not $v.redis.internal.enabled) (not $v.redis.auth.existingSecret) (not $v.redis.auth.password) -}}
{{- $who := ternary (printf " (bark.batch.redis_password_env=%s reads it)" (toString $v.bark.batch.redis_password_env)) "" (not (empty $v.bark.batch.redis_password_env)) -}}
{{- fail (printf "external Redis with redis.auth.enabled needs its password%s: set redis.auth.existingSecret (or redis.auth.password), or redis.auth.enabled=false (then also bark.batch.redis_password_env=null)" $who) -}}
{{- end -}}
{{- end -}}
