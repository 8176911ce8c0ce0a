{{/*
The Ray Serve config (spec.serveConfigV2), the Go twin of
serving/serve_config.py:render_serve_config. tests/helm checks that both give
the same document for every value set; change them together.
*/}}

{{/* Defaults of serving.config.Autoscaling: a user's partial autoscaling map is completed with them. */}}
{{- define "bark-serve.autoscalingDefaults" -}}
min_replicas: 1
max_replicas: 1
target_ongoing_requests: 8.0
upscale_delay_s: 10.0
downscale_delay_s: 120.0
{{- end -}}

{{/*
The BarkConfig fields that may be null, by section ("." is the top level).
Helm drops a key that user values set to null, and BarkConfig would then fill
in its default (pool: null would come back as the stage's own pool), so
barkArgs puts null back for each of these that is gone. tests/helm sets every
nullable field of BarkConfig to null and compares, so this list cannot drift.
*/}}
{{- define "bark-serve.nullableFields" -}}
".": [voices_dir]
orchestrator: [pool, autoscaling, api_keys_env, first_segment_max_tokens]
semantic: [pool, autoscaling, torch_threads]
coarse: [pool, autoscaling, torch_threads]
fine: [pool, autoscaling, torch_threads]
codec: [pool, autoscaling, torch_threads]
batch: [redis_url, redis_password_env, redis_tls_ca_file, results_dir]
batch.worker: [pool, autoscaling]
batch.quota: [max_jobs_in_flight, max_items_queued, max_result_bytes, max_request_bytes, max_follow_streams]
voice_cloning: [pool, autoscaling, hubert, quantizer, max_voices_per_key, store_dir]
{{- end -}}

{{/* Every placement in the bark block, by deployment name (BatchWorker included even when disabled). */}}
{{- define "bark-serve.placementPaths" -}}
Orchestrator: [orchestrator]
SemanticServer: [semantic]
CoarseServer: [coarse]
FineServer: [fine]
CodecServer: [codec]
BatchWorker: [batch, worker]
VoiceEncoder: [voice_cloning]
{{- end -}}

{{/*
applications[0].args: the bark block as BarkConfig.model_dump(mode="json")
gives it, with nulls put back and autoscaling maps completed. (A user's null
inside voice_aliases just removes that alias.) Returns YAML.
*/}}
{{- define "bark-serve.barkArgs" -}}
{{- $args := deepCopy .Values.bark -}}
{{- range $section, $fields := include "bark-serve.nullableFields" . | fromYaml -}}
{{- $m := $args -}}
{{- if ne $section "." }}{{ range splitList "." $section }}{{ $m = get $m . }}{{ end }}{{ end -}}
{{- if kindIs "map" $m -}}
{{- range $fields }}{{ if not (hasKey $m .) }}{{ $_ := set $m . nil }}{{ end }}{{ end -}}
{{- end -}}
{{- end -}}
{{- $fill := include "bark-serve.autoscalingDefaults" . | fromYaml -}}
{{- range $dep, $path := include "bark-serve.placementPaths" . | fromYaml -}}
{{- $p := $args -}}
{{- range $path }}{{ $p = get $p . }}{{ end -}}
{{- if kindIs "map" $p.autoscaling -}}
{{- range $k, $v := $fill -}}
{{- if not (hasKey $p.autoscaling $k) }}{{ $_ := set $p.autoscaling $k $v }}{{ end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- toYaml $args -}}
{{- end -}}

{{/* One deployments: item (serve_config.deployment_entry). Args: (list name placement). */}}
{{- define "bark-serve.deploymentEntry" -}}
{{- $name := index . 0 -}}{{- $p := index . 1 -}}
{{- $opts := dict "num_cpus" $p.num_cpus -}}
{{- if $p.num_gpus }}{{ $_ := set $opts "num_gpus" $p.num_gpus }}{{ end -}}
{{- if $p.pool }}{{ $_ := set $opts "resources" (dict (printf "bark_pool_%s" $p.pool) 1) }}{{ end -}}
{{- $entry := dict "name" $name "max_ongoing_requests" $p.max_ongoing_requests "max_queued_requests" $p.max_queued_requests "ray_actor_options" $opts -}}
{{- if kindIs "map" $p.autoscaling -}}
{{- $_ := set $entry "autoscaling_config" $p.autoscaling -}}
{{- else -}}
{{- $_ := set $entry "num_replicas" $p.num_replicas -}}
{{- end -}}
{{- toYaml $entry -}}
{{- end -}}

{{/* The whole Serve config document. */}}
{{- define "bark-serve.serveConfig" -}}
{{- $args := include "bark-serve.barkArgs" . | fromYaml -}}
{{- $deps := list (include "bark-serve.deploymentEntry" (list "Orchestrator" $args.orchestrator) | fromYaml) -}}
{{- $names := dict "semantic" "SemanticServer" "coarse" "CoarseServer" "fine" "FineServer" "codec" "CodecServer" -}}
{{- range $stage := list "semantic" "coarse" "fine" "codec" }}{{/* stages.constants.STAGES order */}}
{{- $deps = append $deps (include "bark-serve.deploymentEntry" (list (get $names $stage) (get $args $stage)) | fromYaml) -}}
{{- end -}}
{{- if $args.batch.enabled -}}
{{- $deps = append $deps (include "bark-serve.deploymentEntry" (list "BatchWorker" $args.batch.worker) | fromYaml) -}}
{{- end -}}
{{- if $args.voice_cloning.enabled -}}
{{- $deps = append $deps (include "bark-serve.deploymentEntry" (list "VoiceEncoder" $args.voice_cloning) | fromYaml) -}}
{{- end -}}
{{- $app := dict "name" $args.app_name "route_prefix" "/" "import_path" "bark_serve.serving.app:build_app" "args" $args "deployments" $deps -}}
{{- $http := dict "host" $args.http_host "port" $args.http_port -}}
{{- /* The one chart-only field (not in BarkConfig; tests/helm/test_serve_http.py): null leaves Serve's default. */ -}}
{{- with .Values.serveHttp }}{{ if .keepAliveTimeoutS }}{{ $_ := set $http "keep_alive_timeout_s" .keepAliveTimeoutS }}{{ end }}{{ end -}}
{{- $doc := dict "proxy_location" "EveryNode" "http_options" $http "applications" (list $app) -}}
{{- toYaml $doc -}}
{{- end -}}

{{/* Pools that need a worker group: those of the stages and the orchestrator, the batch worker's when batch is on,
and the voice encoder's when voice cloning is on. */}}
{{- define "bark-serve.poolsInUse" -}}
{{- $args := include "bark-serve.barkArgs" . | fromYaml -}}
{{- $pools := list -}}
{{- $placements := list $args.orchestrator $args.semantic $args.coarse $args.fine $args.codec -}}
{{- if $args.batch.enabled }}{{ $placements = append $placements $args.batch.worker }}{{ end -}}
{{- if $args.voice_cloning.enabled }}{{ $placements = append $placements $args.voice_cloning }}{{ end -}}
{{- range $placements -}}
{{- if .pool }}{{ $pools = append $pools .pool }}{{ end -}}
{{- end -}}
{{- toYaml (dict "pools" ($pools | uniq | sortAlpha)) -}}
{{- end -}}
