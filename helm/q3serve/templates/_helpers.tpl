{{- define "q3serve.name" -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}

{{- define "q3serve.labels" -}}
app.kubernetes.io/name: q3serve
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "q3serve.selector" -}}
app.kubernetes.io/name: q3serve
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "q3serve.apiKeySecret" -}}
{{- if .Values.apiKeys.existingSecret -}}{{ .Values.apiKeys.existingSecret }}{{- else -}}{{ include "q3serve.name" . }}-api-keys{{- end -}}
{{- end -}}

{{/* The AppConfig handed to deployments.app:app_builder: the values' `app`, with the model path. */}}
{{- define "q3serve.appConfig" -}}
{{- $app := deepCopy .Values.app -}}
{{- if not $app.model -}}{{- $_ := set $app "model" .Values.model.mountPath -}}{{- end -}}
{{- toYaml $app -}}
{{- end -}}

{{/* Checks that JSON schema cannot express; each failure names the value. */}}
{{- define "q3serve.validate" -}}
{{- $m := .Values.model -}}
{{- if and (not $m.pvc.claimName) (not $m.hostPath) -}}
{{- fail "model: set model.pvc.claimName or model.hostPath (the checkpoint is not downloaded at start)" -}}
{{- end -}}
{{- if and $m.pvc.claimName $m.hostPath -}}
{{- fail "model: set only one of model.pvc.claimName and model.hostPath" -}}
{{- end -}}
{{- range $name := list "thinking" "fast" -}}
{{- $pool := index $.Values.app $name | default dict -}}
{{- if or (not (hasKey $pool "enabled")) $pool.enabled -}}
{{- $a := 1 -}}{{- if hasKey $pool "attention_shards" -}}{{- $a = int $pool.attention_shards -}}{{- end -}}
{{- $e := 1 -}}{{- if hasKey $pool "expert_groups" -}}{{- $e = int $pool.expert_groups -}}{{- end -}}
{{- if lt $a 1 -}}{{- fail (printf "app.%s.attention_shards: must be at least 1, got %d" $name $a) -}}{{- end -}}
{{- if lt $e 1 -}}{{- fail (printf "app.%s.expert_groups: must be at least 1, got %d" $name $e) -}}{{- end -}}
{{- if gt $e (int $m.numExperts) -}}{{- fail (printf "app.%s.expert_groups: %d groups for %d experts (model.numExperts)" $name $e (int $m.numExperts)) -}}{{- end -}}
{{- if and (eq (index $pool "layout" | default "separate") "colocated") (ne $a $e) -}}
{{- fail (printf "app.%s.layout: colocated pairs each attention shard with one expert group; got %d shards and %d groups" $name $a $e) -}}
{{- end -}}
{{- $as := index $pool "autoscaling" | default dict -}}
{{- $min := 1 -}}{{- if hasKey $as "min_replicas" -}}{{- $min = int $as.min_replicas -}}{{- end -}}
{{- $max := 1 -}}{{- if hasKey $as "max_replicas" -}}{{- $max = int $as.max_replicas -}}{{- end -}}
{{- if lt $max $min -}}
{{- fail (printf "app.%s.autoscaling.max_replicas (%d) is below min_replicas (%d)" $name $max $min) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if .Values.drain.enabled -}}
{{- $grace := 0 -}}
{{- range $name := list "thinking" "fast" -}}
{{- $pool := index $.Values.app $name | default dict -}}
{{- if or (not (hasKey $pool "enabled")) $pool.enabled -}}
{{- $g := 30 -}}{{- if hasKey $pool "graceful_shutdown_timeout_s" -}}{{- $g = int (ceil $pool.graceful_shutdown_timeout_s) -}}{{- end -}}
{{- if gt $g $grace -}}{{- $grace = $g -}}{{- end -}}
{{- end -}}
{{- end -}}
{{- $need := add $grace 20 -}}
{{- if lt (int .Values.drain.terminationGracePeriodSeconds) $need -}}
{{- fail (printf "drain.terminationGracePeriodSeconds: %d is too short for the pools' graceful_shutdown_timeout_s %d (the ingress gets 10 s more, the drain deadline is 10 s before the end): at least %d" (int .Values.drain.terminationGracePeriodSeconds) $grace $need) -}}
{{- end -}}
{{- end -}}
{{- range $group, $spec := .Values.workerGroups -}}
{{- if lt (int $spec.maxReplicas) (int $spec.minReplicas) -}}
{{- fail (printf "workerGroups.%s.maxReplicas (%d) is below minReplicas (%d)" $group (int $spec.maxReplicas) (int $spec.minReplicas)) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* One Ray container; `role` is head or a worker group's name. */}}
{{- define "q3serve.container" -}}
{{- $ := .root -}}
- name: {{ if eq .role "head" }}ray-head{{ else }}ray-worker{{ end }}
  image: "{{ $.Values.image.repository }}:{{ $.Values.image.tag }}"
  imagePullPolicy: {{ $.Values.image.pullPolicy }}
  ports:
    {{- if eq .role "head" }}
    - {containerPort: 6379, name: gcs-server}
    - {containerPort: 8265, name: dashboard}
    - {containerPort: 10001, name: client}
    {{- end }}
    - {containerPort: {{ $.Values.app.http_port | default 8000 }}, name: serve}
    - {containerPort: {{ $.Values.app.grpc_port | default 9000 }}, name: serve-grpc}
    - {containerPort: 8080, name: metrics}
  env:
    - name: Q3SERVE_API_KEYS
      valueFrom:
        secretKeyRef: {name: {{ include "q3serve.apiKeySecret" $ }}, key: api-keys, optional: true}
    {{- if eq .role "head" }}
    {{- /* Serve's controller runs here: deployments/app.py SERVE_CONTROLLER_ENV */}}
    - {name: RAY_SERVE_FORCE_STOP_UNHEALTHY_REPLICAS, value: "1"}
    - {name: RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S, value: "30"}
    {{- end }}
    {{- /* every pod's proxy and replicas: deployments/app.py SERVE_PROCESS_ENV */}}
    - {name: RAY_SERVE_USE_GRPC_BY_DEFAULT, value: "1"}
    - {name: RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH, value: "2147483647"}
    {{- if ne .role "head" }}
    {{- $nccl := $.Values.nccl }}
    {{- with $nccl.socketIfname }}
    - {name: NCCL_SOCKET_IFNAME, value: {{ . | quote }}}
    {{- end }}
    {{- with $nccl.ibHca }}
    - {name: NCCL_IB_HCA, value: {{ . | quote }}}
    {{- end }}
    {{- with $nccl.debug }}
    - {name: NCCL_DEBUG, value: {{ . | quote }}}
    {{- end }}
    {{- range $k, $v := $nccl.env }}
    - {name: {{ $k }}, value: {{ $v | quote }}}
    {{- end }}
    {{- end }}
  resources:
    {{- if eq .role "head" }}
    {{- toYaml $.Values.head.resources | nindent 4 }}
    {{- else }}
    {{- $g := index $.Values.workerGroups .role }}
    {{- $rdma := $.Values.nccl.rdma }}
    requests:
      {{- toYaml $g.resources.requests | nindent 6 }}
      nvidia.com/gpu: {{ $g.gpusPerPod | quote }}
      {{- if $rdma.resourceName }}
      {{ $rdma.resourceName }}: {{ $rdma.count | quote }}
      {{- end }}
    limits:
      {{- toYaml $g.resources.limits | nindent 6 }}
      nvidia.com/gpu: {{ $g.gpusPerPod | quote }}
      {{- if $rdma.resourceName }}
      {{ $rdma.resourceName }}: {{ $rdma.count | quote }}
      {{- end }}
    {{- end }}
  {{- if and (ne .role "head") $.Values.nccl.rdma.resourceName }}
  securityContext:
    capabilities: {add: [IPC_LOCK]}   # RDMA registers (locks) memory
  {{- end }}
  {{- if and (ne .role "head") $.Values.drain.enabled }}
  lifecycle:
    preStop:
      exec:
        command: ["q3serve", "drain-node", "--deadline-s", "{{ sub (int $.Values.drain.terminationGracePeriodSeconds) 10 }}"]
  {{- end }}
  readinessProbe:
    httpGet:
      path: {{ if eq .role "head" }}/health{{ else }}/-/healthz{{ end }}
      port: serve
    initialDelaySeconds: {{ $.Values.probes.initialDelaySeconds }}
    periodSeconds: {{ $.Values.probes.periodSeconds }}
    failureThreshold: {{ $.Values.probes.failureThreshold }}
  volumeMounts:
    - {name: model, mountPath: {{ $.Values.model.mountPath }}, readOnly: true}
    {{- if ne .role "head" }}
    - {name: dshm, mountPath: /dev/shm}
    {{- end }}
{{- end -}}

{{- define "q3serve.volumes" -}}
{{- $ := .root -}}
- name: model
  {{- if $.Values.model.pvc.claimName }}
  persistentVolumeClaim: {claimName: {{ $.Values.model.pvc.claimName }}, readOnly: true}
  {{- else }}
  hostPath: {path: {{ $.Values.model.hostPath }}, type: Directory}
  {{- end }}
{{- if ne .role "head" }}
- name: dshm
  emptyDir: {medium: Memory, sizeLimit: {{ (index $.Values.workerGroups .role).shmSize }}}
{{- end }}
{{- end -}}
