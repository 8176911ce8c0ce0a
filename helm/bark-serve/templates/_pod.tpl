{{/* Pieces every Ray pod shares (head and workers). */}}

{{/*
Env of Ray containers. Secrets reach the replicas this way because Ray worker
processes inherit the raylet's environment; putting them in the serve config's
runtime_env would write them into the RayService spec in clear text.
*/}}
{{- define "bark-serve.rayEnv" -}}
- name: RAY_AUTH_MODE
  value: {{ ternary "token" "disabled" .Values.rayAuth.enabled | quote }}
{{- if .Values.rayAuth.enabled }}
- name: RAY_AUTH_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "bark-serve.rayTokenSecret" . }}
      key: auth_token
{{- end }}
{{- with .Values.bark.orchestrator.api_keys_env }}
- name: {{ . }}
  valueFrom:
    secretKeyRef:
      name: {{ include "bark-serve.apiKeysSecret" $ }}
      key: {{ $.Values.apiKeys.secretKey }}
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
      key: {{ $.Values.weights.hfToken.secretKey }}
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
