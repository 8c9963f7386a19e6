{{/* Chart name, overridable. */}}
{{- define "mot-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-scoped resource name, at most 63 characters (DNS-1123 label). */}}
{{- define "mot-operator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "mot-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels every resource carries. */}}
{{- define "mot-operator.labels" -}}
helm.sh/chart: {{ include "mot-operator.chart" . }}
{{ include "mot-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: mot-operator
{{- end }}

{{/* Labels that select the operator pod; never change them after install (selectors are immutable). */}}
{{- define "mot-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mot-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: controller
{{- end }}

{{- define "mot-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "mot-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "mot-operator.metricsServiceName" -}}
{{- printf "%s-metrics" (include "mot-operator.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* repository:tag, or repository@digest when a digest is given; tag defaults to appVersion. */}}
{{- define "mot-operator.imageRef" -}}
{{- $image := index . 0 }}
{{- $appVersion := index . 1 }}
{{- if $image.digest }}
{{- printf "%s@%s" $image.repository $image.digest }}
{{- else }}
{{- printf "%s:%s" $image.repository (default $appVersion $image.tag) }}
{{- end }}
{{- end }}

{{/* The rules of the PrometheusRule; with default values they equal alerts/mot-operator-alerts.yaml. */}}
{{- define "mot-operator.alertGroups" -}}
{{- $a := .Values.alerts }}
{{- $job := default (include "mot-operator.metricsServiceName" .) $a.operatorDown.job }}
- name: mot-operator
  rules:
    - alert: MoTRunFailed
      expr: sum(mot_runs{phase="Failed"}) > 0
      labels:
        severity: {{ $a.runFailed.severity }}
      annotations:
        summary: "{{ "{{" }} $value {{ "}}" }} MoTRun(s) in phase Failed"
        description: >-
          At least one MoTRun ended Failed. `kubectl get motruns -A` shows which; its status
          message and Events name the failed branch or stage, the attempts and the trainer's reason.
    - alert: MoTRunNoProgress
      expr: (time() - mot_run_last_progress_timestamp_seconds) > {{ int64 $a.noProgress.thresholdSeconds }}
      for: {{ $a.noProgress.for }}
      labels:
        severity: {{ $a.noProgress.severity }}
      annotations:
        summary: "MoTRun {{ "{{" }} $labels.namespace {{ "}}" }}/{{ "{{" }} $labels.motrun {{ "}}" }} has made no progress for {{ int64 $a.noProgress.thresholdSeconds }}s"
        description: >-
          The run's status has not changed for longer than the threshold. Check its Jobs
          (`kubectl get jobs -l mot.dev/run={{ "{{" }} $labels.motrun {{ "}}" }} -n {{ "{{" }} $labels.namespace {{ "}}" }}`):
          pods pending for GPUs, a suspended Kueue workload or a hung trainer are the usual causes.
    - alert: MoTJobRetriesHigh
      expr: sum by (stage) (increase(mot_job_retries_total[{{ $a.jobRetries.window }}])) > {{ $a.jobRetries.threshold }}
      labels:
        severity: {{ $a.jobRetries.severity }}
      annotations:
        summary: "More than {{ $a.jobRetries.threshold }} {{ "{{" }} $labels.stage {{ "}}" }} Job retries in {{ $a.jobRetries.window }}"
        description: >-
          Branch, merge or eval Jobs keep failing and being retried. Failed pods' termination
          messages carry the trainer's one-line reason (`kubectl describe motrun`).
    - alert: MoTStagePendingTooLong
      expr: (time() - mot_stage_pending_since_timestamp_seconds{{ with $a.stagePending.ignoreReasons }}{reason!~"{{ join "|" . }}"}{{ end }}) > {{ int64 $a.stagePending.thresholdSeconds }}
      labels:
        severity: {{ $a.stagePending.severity }}
      annotations:
        summary: "MoTRun {{ "{{" }} $labels.namespace {{ "}}" }}/{{ "{{" }} $labels.motrun {{ "}}" }}: {{ "{{" }} $labels.stage {{ "}}" }}{{ "{{" }} with $labels.teacher {{ "}}" }} branch {{ "{{" }} . {{ "}}" }}{{ "{{" }} end {{ "}}" }} has had no running Pod for {{ "{{" }} $value | humanizeDuration {{ "}}" }}: {{ "{{" }} $labels.reason {{ "}}" }}"
        description: >-
          The stage's Job started but none of its Pods has run for over {{ int64 $a.stagePending.thresholdSeconds }}s
          ({{ "{{" }} $labels.reason {{ "}}" }}). `kubectl describe motrun {{ "{{" }} $labels.motrun {{ "}}" }} -n {{ "{{" }} $labels.namespace {{ "}}" }}`
          shows the message and Events. Unschedulable: no node fits the Pod's GPUs, memory or tolerations;
          image errors: check the trainer image and imagePullSecrets; CrashLoopBackOff or Create*Error: the
          Pod's logs and the Secrets it mounts. spec.pendingTimeoutSeconds fails such a run by itself.
    - alert: MoTOperatorDown
      expr: up{job="{{ $job }}"} == 0 or absent(up{job="{{ $job }}"})
      for: {{ $a.operatorDown.for }}
      labels:
        severity: {{ $a.operatorDown.severity }}
      annotations:
        summary: "The mot-operator metrics endpoint has been down for {{ $a.operatorDown.for }}"
        description: >-
          No MoTRun makes progress while the operator is down. Check the operator Deployment's
          pods and logs.
{{- end }}

{{/* Exactly what `mot operator` calls (docs/architecture.md, "Operator process"); no wildcard. */}}
{{- define "mot-operator.rbacRules" -}}
- apiGroups: ["mot.dev"]
  resources: ["motruns"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["mot.dev"]
  resources: ["motruns/status"]
  verbs: ["get", "patch", "update"]
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# Pods, read only: termination messages, why a stage waits, disruptions (watched), and their IPs to
# read a training branch's progress from its metrics port.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch"]
# Kueue's Workloads, read only: why a queued Job is not admitted (harmless without Kueue).
- apiGroups: ["kueue.x-k8s.io"]
  resources: ["workloads"]
  verbs: ["get", "list"]
# Headless Services of multi-node branches.
- apiGroups: [""]
  resources: ["services"]
  verbs: ["get", "create", "delete"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- if .Values.jobset.enabled }}
# JobSets running multi-node branches (jobset.enabled; the JobSet controller must be installed).
- apiGroups: ["jobset.x-k8s.io"]
  resources: ["jobsets"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
{{- end }}
{{- end }}
