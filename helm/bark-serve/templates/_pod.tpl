{{/* Pieces every Ray pod shares (head and workers). */}}

{{/*
Env of Ray containers. Secrets reach the replicas this way because Ray worker
processes inherit the raylet's environment; putting them in the serve config's
runtime_env would write them into the RayService spec in clear text.
Called with (list $ WHERE): WHERE is "@head", a pool name, or "@job" (the dataset
RayJob's cluster). The API keys reach only the containers that can run an
Orchestrator replica (the only reader): the pods of bark.orchestrator.pool, or,
when it is null (any node with free CPU), the head and every pool; never the RayJob.
*/}}
{{- define "bark-serve.rayEnv" -}}
{{- $where := index . 1 -}}
{{- $root := index . 0 -}}
{{- with $root -}}
- name: RAY_AUTH_MODE
  value: {{ ternary "token" "disabled" .Values.rayAuth.enabled | quote }}
{{- if .Values.rayAuth.enabled }}
- name: RAY_AUTH_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "bark-serve.rayTokenSecret" . }}
      key: auth_token
{{- end }}
{{- $orchPool := .Values.bark.orchestrator.pool -}}
{{- if and .Values.bark.orchestrator.api_keys_env (ne $where "@job") (or (not $orchPool) (eq (toString $orchPool) $where)) }}
{{- with .Values.bark.orchestrator.api_keys_env }}
- name: {{ . }}
  valueFrom:
    secretKeyRef:
      name: {{ include "bark-serve.apiKeysSecret" $root }}
      key: {{ $root.Values.apiKeys.secretKey }}
{{- end }}
{{- end }}
{{- if and .Values.bark.batch.redis_password_env .Values.redis.auth.enabled }}
- name: {{ .Values.bark.batch.redis_password_env }}
  valueFrom:
    secretKeyRef:
      name: {{ include "bark-serve.redisSecret" . }}
      key: {{ .Values.redis.auth.secretKey }}
{{- end }}
- name: HF_HOME
  value: {{ .Values.weights.hfHome | quote }}
{{- if .Values.weights.offline }}
- name: HF_HUB_OFFLINE
  value: "1"
{{- end }}
{{- with .Values.weights.hfToken.secretName }}
- name: HF_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $root.Values.weights.hfToken.secretKey }}
{{- end }}
{{- /* Serve's proxy gets 30 s, not 5, to answer its readiness check: on a node whose cores are busy a
proxy that takes longer to start is restarted over and over (serving/serve_config.py, patient_proxy_start).
extraEnv may set another value. */}}
{{- $proxyReadySet := false }}
{{- range .Values.extraEnv }}
{{- if eq (toString .name) "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S" }}{{ $proxyReadySet = true }}{{ end }}
{{- end }}
{{- if not $proxyReadySet }}
- name: RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S
  value: "30"
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}
{{- end -}}

{{/* Writable places under a read-only root filesystem, and the weights. */}}
{{- define "bark-serve.rayVolumeMounts" -}}
- name: tmp
  mountPath: /tmp
- name: cache
  mountPath: /home/ray/.cache
- name: weights
  mountPath: {{ .Values.weights.mountPath }}
  readOnly: {{ .Values.weights.readOnly }}
{{- with .Values.extraVolumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "bark-serve.rayVolumes" -}}
- name: tmp
  emptyDir: {}
- name: cache
  emptyDir: {}
- name: weights
{{ toYaml .Values.weights.volume | indent 2 }}
{{- with .Values.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* An httpGet probe on the serve port. Args: (list probeValues). */}}
{{- define "bark-serve.httpProbe" -}}
httpGet:
  path: {{ .path }}
  port: serve
initialDelaySeconds: {{ .initialDelaySeconds }}
periodSeconds: {{ .periodSeconds }}
timeoutSeconds: {{ .timeoutSeconds }}
failureThreshold: {{ .failureThreshold }}
{{- end -}}

{{/* rayStartParams as the CRD wants them: every value a string (num-cpus: 0 becomes "0"). */}}
{{- define "bark-serve.startParams" -}}
{{- $out := dict -}}
{{- range $k, $v := . -}}
{{- /* Values files give numbers as float64; 1000000000 must not become "1e+09". */ -}}
{{- if and (kindIs "float64" $v) (eq (float64 (int64 $v)) $v) }}{{ $v = int64 $v }}{{ end -}}
{{- $_ := set $out $k (toString $v) -}}
{{- end -}}
{{- toYaml $out -}}
{{- end -}}
