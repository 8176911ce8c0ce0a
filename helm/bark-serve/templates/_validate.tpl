{{/*
Checks that fail the install with a clear message instead of a RayService that
never becomes ready. Called once from rayservice.yaml.
*/}}
{{- define "bark-serve.validate" -}}
{{- $v := .Values -}}
{{- $envName := "^[A-Za-z_][A-Za-z0-9_]*$" -}}
{{- range $what, $name := dict "bark.orchestrator.api_keys_env" $v.bark.orchestrator.api_keys_env "bark.batch.redis_password_env" $v.bark.batch.redis_password_env -}}
{{- if and $name (not (regexMatch $envName $name)) -}}
{{- fail (printf "%s=%q is not a valid environment variable name" $what $name) -}}
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
{{- end -}}
{{- range $dep, $path := include "bark-serve.placementPaths" . | fromYaml -}}
{{- $p := $args -}}
{{- range $path }}{{ $p = get $p . }}{{ end -}}
{{- if and $p.pool $p.num_gpus (kindIs "map" (get $v.pools $p.pool)) -}}
{{- $cfg := include "bark-serve.overlay" (list $v.poolDefaults (get $v.pools $p.pool)) | fromYaml -}}
{{- if gt (float64 $p.num_gpus) (float64 $cfg.gpu.count) -}}
{{- fail (printf "%s asks for num_gpus=%v but pools.%s.gpu.count is %v: its replicas could never be placed" $dep $p.num_gpus $p.pool $cfg.gpu.count) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- /* Redis. */ -}}
{{- if and $v.bark.batch.enabled (not $v.bark.batch.redis_url) -}}
{{- fail (printf "bark.batch.enabled needs bark.batch.redis_url (in-chart Redis: redis://%s:6379/0 with redis.internal.enabled=true)" (include "bark-serve.redisName" .)) -}}
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
{{- if and (include "bark-serve.redisUsed" .) $v.redis.auth.enabled (not $v.redis.internal.enabled) (not $v.redis.auth.existingSecret) (not $v.redis.auth.password) -}}
{{- fail "external Redis with redis.auth.enabled: set redis.auth.existingSecret (or redis.auth.password), or redis.auth.enabled=false" -}}
{{- end -}}
{{- end -}}
