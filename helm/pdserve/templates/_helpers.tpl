{{- define "pdserve.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "pdserve.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "pdserve.labels" -}}
{{ include "pdserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "pdserve.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "pdserve.secretName" -}}
{{ .Values.secrets.existingSecret | default (printf "%s-credentials" (include "pdserve.fullname" .)) }}
{{- end -}}

{{- define "pdserve.routerAddress" -}}
{{ include "pdserve.fullname" . }}-router:{{ .Values.router.port }}
{{- end -}}

{{/* Secrets reach the processes as files or environment variables from the Secret, never as arguments. */}}
{{- define "pdserve.volumes" -}}
- name: config
  configMap:
    name: {{ include "pdserve.fullname" . }}-config
- name: credentials
  secret:
    secretName: {{ include "pdserve.secretName" . }}
    items:
      - key: {{ .Values.secrets.clusterSecretKey }}
        path: cluster-secret
- name: cache
  emptyDir: {}
- name: tmp
  emptyDir: {}
{{- end -}}

{{- define "pdserve.volumeMounts" -}}
- name: config
  mountPath: /etc/pdserve
  readOnly: true
- name: credentials
  mountPath: /var/run/secrets/pdserve
  readOnly: true
- name: cache
  mountPath: /var/cache/pdserve
- name: tmp
  mountPath: /tmp
{{- end -}}

{{/* The admin token and database URL: router and gateway only. */}}
{{- define "pdserve.controlPlaneEnv" -}}
- name: PDSERVE_ROUTER__ADMIN_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "pdserve.secretName" . }}
      key: {{ .Values.secrets.adminTokenKey }}
      optional: true
{{- if include "pdserve.bundledPostgres" . }}
- name: PDSERVE_DB_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "pdserve.fullname" . }}-postgresql
      key: password
- name: PDSERVE_DATABASE__URL
  value: "postgresql+psycopg://pdserve:$(PDSERVE_DB_PASSWORD)@{{ include "pdserve.fullname" . }}-postgresql:5432/pdserve"
{{- else }}
- name: PDSERVE_DATABASE__URL
  valueFrom:
    secretKeyRef:
      name: {{ include "pdserve.secretName" . }}
      key: {{ .Values.secrets.databaseUrlKey }}
{{- end }}
{{- end -}}

{{- define "pdserve.securityContext" -}}
runAsNonRoot: true
runAsUser: 10001
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
{{- end -}}

{{- define "pdserve.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
fsGroup: 10001
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* The bundled PostgreSQL runs unless an external database URL is given. */}}
{{- define "pdserve.bundledPostgres" -}}
{{- if and .Values.database.postgresql.enabled (not .Values.database.url) }}true{{ end -}}
{{- end -}}

{{/* The database: refuse SQLite, which the router and gateway pods cannot share. */}}
{{- define "pdserve.checkDatabase" -}}
{{- $db := .Values.database -}}
{{- if hasPrefix "sqlite" $db.url -}}
{{- fail "database.url: SQLite cannot be shared by the router and gateway pods (more than one pod writes); use PostgreSQL" -}}
{{- end -}}
{{- if not (or $db.url $db.postgresql.enabled .Values.secrets.existingSecret) -}}
{{- fail "database: set database.url (PostgreSQL) or database.postgresql.enabled=true; the default SQLite cannot be shared by the router and gateway pods" -}}
{{- end -}}
{{- end -}}
