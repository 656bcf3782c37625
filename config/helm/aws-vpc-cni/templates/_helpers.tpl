{{- /* Names. nameOverride and fullnameOverride default to aws-node, the name every tool expects
       for the DaemonSet, its ServiceAccount and RBAC; with fullnameOverride emptied the name is
       built from the release name, as Helm charts usually do. */ -}}
{{- define "aws-vpc-cni.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "aws-vpc-cni.fullname" -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- $full := printf "%s-%s" .Release.Name $name -}}
{{- if .Values.fullnameOverride -}}
{{- $full = .Values.fullnameOverride -}}
{{- else if contains $name .Release.Name -}}
{{- $full = .Release.Name -}}
{{- end -}}
{{- $full | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "aws-vpc-cni.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "aws-vpc-cni.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "aws-vpc-cni.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "aws-vpc-cni.labels" -}}
app.kubernetes.io/name: {{ include "aws-vpc-cni.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ default "Helm" .Release.Service }}
helm.sh/chart: {{ include "aws-vpc-cni.chart" . }}
k8s-app: aws-node
{{- end -}}

{{- /* The DaemonSet's selector, immutable once created. originalMatchLabels: true selects on
       k8s-app: aws-node, as the static manifest and EKS's own aws-node do (needed to adopt one of
       those into a release); false, the default, on name and instance (and podLabels), as a
       release of upstream's chart made with its defaults does, so helm upgrade over it works. */ -}}
{{- define "aws-vpc-cni.selectorLabels" -}}
{{- if .Values.originalMatchLabels -}}
k8s-app: aws-node
{{- else -}}
app.kubernetes.io/name: {{ include "aws-vpc-cni.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- with .Values.podLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}
{{- end -}}

{{- /* An image reference from an image block of values, called with (dict "image" <block>
       "name" <repository name under an ECR registry>). First that applies:
         override            the whole reference, as given;
         overrideRepository  <overrideRepository>:<tag>;
         account             <account>.dkr.<endpoint>.<region>.<domain>/<name>:<tag>, an ECR
                             registry (upstream's values set account; so do mirrors in ECR);
         repository          <repository>:<tag> (this chart's own images). */ -}}
{{- define "aws-vpc-cni.imageRef" -}}
{{- $i := .image -}}
{{- $tag := toString $i.tag -}}
{{- if $i.override -}}
{{- toString $i.override -}}
{{- else if $i.overrideRepository -}}
{{- printf "%s:%s" (toString $i.overrideRepository) $tag -}}
{{- else if $i.account -}}
{{- printf "%s.dkr.%s.%s.%s/%s:%s" (toString $i.account) (toString $i.endpoint) (toString $i.region) (toString $i.domain) .name $tag -}}
{{- else -}}
{{- printf "%s:%s" (toString (required (printf "%s: set repository, account, overrideRepository or override" .name) $i.repository)) $tag -}}
{{- end -}}
{{- end -}}

{{- define "aws-vpc-cni.image" -}}
{{- include "aws-vpc-cni.imageRef" (dict "image" .Values.image "name" "amazon-k8s-cni") -}}
{{- end -}}

{{- define "aws-vpc-cni.initImage" -}}
{{- include "aws-vpc-cni.imageRef" (dict "image" .Values.init.image "name" "amazon-k8s-cni-init") -}}
{{- end -}}

{{- define "aws-vpc-cni.nodeAgentImage" -}}
{{- include "aws-vpc-cni.imageRef" (dict "image" .Values.nodeAgent.image "name" "amazon/aws-network-policy-agent") -}}
{{- end -}}

{{- /* The network policy agent's bind address from a port (values hold "8162"). */ -}}
{{- define "aws-vpc-cni.bindAddr" -}}
{{- printf ":%s" (toString .) -}}
{{- end -}}
