{{/* Names, labels and small shared pieces. */}}

{{- define "bark-serve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 47 | trimSuffix "-" -}}
{{- end -}}

{{/* Cut to 47 characters: KubeRay rejects longer RayService names (53 minus its suffix). */}}
{{- define "bark-serve.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 47 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 47 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 47 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "bark-serve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "bark-serve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "bark-serve.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "bark-serve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Labels of Ray pods (NetworkPolicies select them; KubeRay adds ray.io/* labels). */}}
{{- define "bark-serve.rayPodLabels" -}}
{{ include "bark-serve.selectorLabels" . }}
app.kubernetes.io/component: ray
{{- end -}}

{{/* Labels of the dataset RayJob's submitter pod (K8sJobMode: `ray job submit` to the head's dashboard). */}}
{{- define "bark-serve.submitterPodLabels" -}}
{{ include "bark-serve.selectorLabels" . }}
app.kubernetes.io/component: dataset-submitter
{{- end -}}

{{- define "bark-serve.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* Secret names: an existing Secret when given, else the one this chart makes. */}}
{{- define "bark-serve.rayTokenSecret" -}}
{{- default (printf "%s-ray-token" (include "bark-serve.fullname" .)) .Values.rayAuth.existingSecret -}}
{{- end -}}

{{- define "bark-serve.apiKeysSecret" -}}
{{- default (printf "%s-api-keys" (include "bark-serve.fullname" .)) .Values.apiKeys.existingSecret -}}
{{- end -}}

{{- define "bark-serve.redisSecret" -}}
{{- default (printf "%s-redis" (include "bark-serve.fullname" .)) .Values.redis.auth.existingSecret -}}
{{- end -}}

{{/*
<fullname>-<suffix>, the fullname cut so that the whole stays within a limit (trimSuffix "-"): short
release names keep <fullname>-<suffix> unchanged. Args: (list $ suffix maxLength).
*/}}
{{- define "bark-serve.suffixedName" -}}
{{- $suffix := index . 1 -}}
{{- $base := include "bark-serve.fullname" (index . 0) | trunc (int (sub (index . 2) (add1 (len $suffix)))) | trimSuffix "-" -}}
{{- printf "%s-%s" $base $suffix -}}
{{- end -}}

{{/* The in-chart Redis (StatefulSet and Service): at most 52 characters, so that the StatefulSet's
controller-revision-hash label (<name>-<hash>) stays within 63. */}}
{{- define "bark-serve.redisName" -}}
{{- include "bark-serve.suffixedName" (list . "redis" 52) -}}
{{- end -}}

{{/* The dataset RayJob: KubeRay rejects RayJob names over 47 characters. */}}
{{- define "bark-serve.datasetJobName" -}}
{{- include "bark-serve.suffixedName" (list . "dataset" 47) -}}
{{- end -}}

{{/*
Whether the app itself talks to Redis ("true" or ""): batch jobs, and registered voices whenever
bark.batch names a Redis (serving/config.py, BarkConfig.voice_store_redis), batch on or not.
*/}}
{{- define "bark-serve.appRedisUsed" -}}
{{- $b := .Values.bark.batch -}}
{{- if or $b.enabled $b.redis_url $b.redis_url_env -}}true{{- end -}}
{{- end -}}

{{/* Whether anything in this release talks to Redis or reads its password ("true" or ""). */}}
{{- define "bark-serve.redisUsed" -}}
{{- if or (include "bark-serve.appRedisUsed" .) .Values.bark.batch.redis_password_env .Values.gcsFaultTolerance.enabled .Values.redis.internal.enabled -}}true{{- end -}}
{{- end -}}

{{/*
The host of bark.batch.redis_url when it is a Redis that redis.auth protects (the in-chart Redis, or
redis.external.address), else "". Such a Redis asks for the password, so the app needs redis_password_env.
*/}}
{{- define "bark-serve.appRedisHostNeedingAuth" -}}
{{- $url := toString (default "" .Values.bark.batch.redis_url) -}}
{{- /* redis[s]://[user[:password]@]host[:port][/db]: no password in the URL */ -}}
{{- if and $url (regexMatch "^rediss?://" $url) (not (regexMatch "^rediss?://[^/@]*:[^/@]*@" $url)) -}}
{{- $host := regexReplaceAll "^rediss?://([^/@]*@)?([^:/?]*).*$" $url "${2}" -}}
{{- $protected := list -}}
{{- if .Values.redis.internal.enabled }}{{ $protected = append $protected (include "bark-serve.redisName" .) }}{{ end -}}
{{- with .Values.redis.external.address }}{{ $protected = append $protected (regexReplaceAll ":[0-9]+$" . "") }}{{ end -}}
{{- range $protected -}}
{{- /* the same name, or one of them a longer form of the other (svc.namespace, svc.namespace.svc...) */ -}}
{{- if or (eq $host .) (hasPrefix (printf "%s." .) $host) (and (contains "." $host) (hasPrefix (printf "%s." $host) .)) }}{{ $host }}{{ break }}{{ end -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
A warning for NOTES.txt ("" when none): voice cloning on, but registered voices live in each replica's own
folder (~/.cache/bark-serve/voices, an emptyDir), lost on restart and not shared between replicas.
*/}}
{{- define "bark-serve.voiceStoreWarning" -}}
{{- $b := .Values.bark -}}
{{- if and $b.voice_cloning.enabled (not (or $b.batch.redis_url $b.batch.redis_url_env $b.voice_cloning.store_dir)) -}}
WARNING: voice cloning is on (bark.voice_cloning.enabled) but registered voices have no durable store:
each Orchestrator replica keeps the voices registered through it in its own pod's emptyDir
(~/.cache/bark-serve/voices), so they are lost when the pod restarts and the other replicas do not see
them. Set bark.batch.redis_url (or bark.batch.redis_url_env), or bark.voice_cloning.store_dir on a
ReadWriteMany volume mounted with extraVolumes/extraVolumeMounts (chart README, "Registered voices");
or set bark.voice_cloning.enabled=false.
{{- end -}}
{{- end -}}

{{/* A warning when GCS fault tolerance and batch jobs share the in-chart Redis and batch results are all kept there. */}}
{{- define "bark-serve.sharedRedisWarning" -}}
{{- $v := .Values -}}
{{- if and $v.gcsFaultTolerance.enabled $v.bark.batch.enabled (not $v.gcsFaultTolerance.redisAddress) (not $v.redis.external.address) $v.redis.internal.enabled (not $v.bark.batch.results_dir) -}}
WARNING: GCS fault tolerance and batch jobs share the in-chart Redis, and with bark.batch.results_dir null
every batch result is kept in it: results can fill its maxmemory (noeviction), and then the head cannot
write its cluster metadata either. Give GCS its own Redis (gcsFaultTolerance.redisAddress), or set
bark.batch.results_dir on a shared volume (chart README, "One Redis for both").
{{- end -}}
{{- end -}}

{{/* Warnings for what anyone in the cluster can reach when networkPolicy is off and a password is off too. */}}
{{- define "bark-serve.openWarning" -}}
{{- $v := .Values -}}
{{- if not $v.networkPolicy.enabled -}}
{{- $open := list -}}
{{- if and $v.redis.internal.enabled (not $v.redis.auth.enabled) -}}
{{- $open = append $open (printf "the in-chart Redis (%s:6379: batch jobs, their results, registered voices%s) has no password (redis.auth.enabled=false)" (include "bark-serve.redisName" .) (ternary ", the GCS metadata" "" $v.gcsFaultTolerance.enabled)) -}}
{{- end -}}
{{- if not $v.rayAuth.enabled -}}
{{- $open = append $open "Ray has no token (rayAuth.enabled=false): the dashboard on 8265 accepts job submissions, which run any code in the cluster" -}}
{{- end -}}
{{- if $open -}}
WARNING: networkPolicy.enabled is false, so every pod in the cluster can reach the Ray and Redis ports, and
{{ join ";\nand " $open }}.
Set networkPolicy.enabled=true (your CNI must enforce NetworkPolicies), or turn the password on.
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Redis host:port for GCS fault tolerance. */}}
{{- define "bark-serve.gcsRedisAddress" -}}
{{- if .Values.gcsFaultTolerance.redisAddress -}}
{{- .Values.gcsFaultTolerance.redisAddress -}}
{{- else if .Values.redis.external.address -}}
{{- .Values.redis.external.address -}}
{{- else if .Values.redis.internal.enabled -}}
{{- printf "%s:6379" (include "bark-serve.redisName" .) -}}
{{- end -}}
{{- end -}}

{{/*
A Secret value (base64) that survives upgrades: the live Secret's value when
there is one (lookup is empty under helm template), else a fresh random one.
Args: (list $ secretName key length).
*/}}
{{- define "bark-serve.stableRandom" -}}
{{- $root := index . 0 -}}{{- $name := index . 1 -}}{{- $key := index . 2 -}}
{{- $live := lookup "v1" "Secret" $root.Release.Namespace $name -}}
{{- if and $live $live.data (hasKey $live.data $key) -}}
{{- index $live.data $key -}}
{{- else -}}
{{- randAlphaNum (index . 3) | b64enc -}}
{{- end -}}
{{- end -}}

{{/*
Deep overlay of two maps: keys of the second win, maps merge recursively.
Unlike sprig's merge it keeps zero values (gpu.count: 0, min_replicas: 0).
Args: (list base top); returns YAML.
*/}}
{{- define "bark-serve.overlay" -}}
{{- $out := deepCopy (index . 0) -}}
{{- range $k, $v := (index . 1) -}}
{{- if and (kindIs "map" $v) (kindIs "map" (get $out $k)) -}}
{{- $_ := set $out $k (include "bark-serve.overlay" (list (get $out $k) $v) | fromYaml) -}}
{{- else -}}
{{- $_ := set $out $k $v -}}
{{- end -}}
{{- end -}}
{{- toYaml $out -}}
{{- end -}}
