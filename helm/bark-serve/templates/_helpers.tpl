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

{{- define "bark-serve.redisName" -}}
{{- printf "%s-redis" (include "bark-serve.fullname" .) -}}
{{- end -}}

{{/* Whether anything in this release talks to Redis ("true" or ""). */}}
{{- define "bark-serve.redisUsed" -}}
{{- if or .Values.bark.batch.enabled .Values.gcsFaultTolerance.enabled .Values.redis.internal.enabled -}}true{{- end -}}
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
