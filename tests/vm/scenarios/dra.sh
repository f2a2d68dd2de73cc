#!/usr/bin/env bash
# Scenario (issue 16): the Kubernetes DRA plugin on a real kernel. No cluster exists here:
# kubelet is the stand-in dra-kubelet-standin (its sequence and limits: GetInfo within 1 s,
# prepare and unprepare within 45 s), the API server the loopback stand-in
# dra-apiserver-standin, reached through a kubeconfig by kube's real client. The daemon, the
# plugin, its sockets, the gRPC wire and every host effect are real.
# register -> a slice shows the igb VF -> prepare a claim allocated to it: the VF is on vfio-pci,
# its /dev/vfio/GROUP is in the CDI spec, the lease belongs to the claim, the metadata file
# decodes to its address as KubeVirt decodes it -> daemon and plugin restart (the plugin killed:
# stale sockets) -> prepare again answers the same -> the lease ended by hand (as a reboot
# ends it) -> prepare takes it again -> unprepare: the VF is on igbvf and the
# files are gone. A VF leased to a VM (the libvirt hook) is refused to a claim and left alone.
. "$PT_REPO/tests/vm/lib.sh"
. "$PT_REPO/tests/vm/scenarios/common.sh"

DRIVER=vfio.passthroughd.io
NODE=vm-node
D="$PT_OUT/dra"
rm -rf "$D" && mkdir -p "$D"
# Under /run, not PT_OUT: unix sockets need a filesystem that has them (9p does not), and
# short paths (kubelet's limit is 108 bytes).
K=/run/k8s
mkdir -p "$K/registry" "$K/plugins" "$K/cdi" "$K/state"
REG="$K/registry/$DRIVER-reg.sock"
EP="$K/plugins/$DRIVER/dra.sock"
KUBELET="$PT_BIN/dra-kubelet-standin"

pf="$(find_dev 0x8086 0x10c9)"
check devices-found test -n "$pf"
modprobe igbvf
modprobe vfio-pci
start_system_bus
start_daemon
check daemon-starts "$CTL" status
exit_is create-2-vfs 0 "$CTL" vf create "$pf" --count 2 --runtime
vf() { basename "$(readlink "$SYS/$pf/virtfn$1")"; }
vf0="$(vf 0)"; vf1="$(vf 1)"
name_of() { echo "pci-${1//[:.]/-}"; }
group_of() { link_name "$SYS/$1/iommu_group"; }
wait_for '[ "$(driver_of "$vf1")" = igbvf ]' 10
expect_eq vfs-on-igbvf "$(driver_of "$vf0") $(driver_of "$vf1")" "igbvf igbvf"

# The API server stand-in, and this node in it.
"$PT_BIN/dra-apiserver-standin" --kubeconfig "$D/kubeconfig" >"$D/api.out" 2>"$D/api.err" &
api_pid=$!
check apiserver-ready wait_for 'grep -q "^ready " "$D/api.out"' 20
URL="$(awk '/^ready /{print $2}' "$D/api.out")"
post() { curl -sf -X POST -H 'Content-Type: application/json' --data "$2" "$URL$1"; }
check node-created post /api/v1/nodes '{"apiVersion":"v1","kind":"Node","metadata":{"name":"'$NODE'"}}'
slices() { curl -sf "$URL/apis/resource.k8s.io/v1/resourceslices"; }
free_of() { slices | jq -r --arg n "$(name_of "$1")" '[.items[].spec.devices[]? | select(.name == $n) | .attributes.free.bool] | first | tostring'; }
claim_json() { # NAME UID DEVICE-ADDRESS
    jq -nc --arg name "$1" --arg uid "$2" --arg dev "$(name_of "$3")" --arg node "$NODE" --arg driver "$DRIVER" '{
      apiVersion: "resource.k8s.io/v1", kind: "ResourceClaim",
      metadata: {name: $name, namespace: "vms", uid: $uid},
      spec: {devices: {requests: [{name: "nic", exactly: {deviceClassName: $driver}}]}},
      status: {allocation: {devices: {results: [{request: "nic", driver: $driver, pool: $node, device: $dev}]}}}}'
}

# Waits until the new plugin serves both sockets: a killed plugin's stale ones stay until the
# new one replaces them, and only a served socket accepts a connection (curl exits 7 when it
# cannot connect; a gRPC server answers its HTTP/1.1 request with anything but that).
served() { curl -s --max-time 2 --unix-socket "$1" http://plugin/ >/dev/null 2>&1; [ $? != 7 ]; }
start_plugin() {
    "$PT_BIN/passthroughd-dra" --node-name "$NODE" --registry-dir "$K/registry" \
        --plugin-dir "$K/plugins/$DRIVER" --cdi-dir "$K/cdi" --state-dir "$K/state" \
        --kubeconfig "$D/kubeconfig" --bus system --resync-secs 5 >>"$D/plugin.log" 2>&1 &
    echo $! >"$D/plugin.pid"
    wait_for 'served "$REG" && served "$EP"' 20
}
plugin_pid() { cat "$D/plugin.pid"; }

# 1. Registration, as kubelet's plugin watcher does it.
check plugin-starts start_plugin
"$KUBELET" register "$K/registry" >"$D/register.json" 2>"$D/register.err"
expect_eq register-exit-0 "$?" 0
expect_eq registered "$(jq -c '[.type, .name, .endpoint, .versions]' "$D/register.json")" \
    "[\"DRAPlugin\",\"$DRIVER\",\"$EP\",[\"v1.DRAPlugin\",\"v1beta1.DRAPlugin\"]]"

# 2. The slice offers the VF, free.
check slice-shows-vf1-free wait_for '[ "$(free_of "$vf1")" = true ]' 30
slices >"$D/slices-before.json"
expect_eq slice-vf1-attributes "$(jq -c --arg n "$(name_of "$vf1")" '.items[].spec.devices[]? | select(.name == $n) | .attributes | [."resource.kubernetes.io/pciBusID".string, .pfAddress.string, .sriovVF.bool, .iommuGroup.int]' "$D/slices-before.json")" \
    "[\"$vf1\",\"$pf\",true,$(group_of "$vf1")]"
expect_eq slice-owner-is-node "$(jq -r '.items[0].metadata.ownerReferences[0] | "\(.kind)/\(.name)"' "$D/slices-before.json")" "Node/$NODE"

# 3. Prepare a claim allocated to vf1.
UID1=11111111-2222-3333-4444-555555555555
check claim1-created post /apis/resource.k8s.io/v1/namespaces/vms/resourceclaims "$(claim_json vm1-nic "$UID1" "$vf1")"
t0="${EPOCHREALTIME/./}"
"$KUBELET" prepare "$EP" vms vm1-nic "$UID1" >"$D/prepare1.json" 2>"$D/prepare1.err"
rc=$?
t1="${EPOCHREALTIME/./}"
expect_eq prepare-exit-0 "$rc" 0
plugin_ms() { grep "prepared vms/vm1-nic" "$D/plugin.log" | sed -n "${1}s/.* ms=\([0-9]*\).*/\1/p"; }
note "prepare of one VF: $(( (t1 - t0) / 1000 )) ms for the kubelet stand-in's whole call (its own start included), $(plugin_ms 1) ms in the plugin (claim read, lease, files)"
# answered FILE UID: the stand-in's answer has an entry for the claim, without an error.
answered() { jq -e --arg u "$2" 'has($u) and .[$u].error == ""' "$1" >/dev/null; }
check prepare-no-error answered "$D/prepare1.json" "$UID1"
expect_eq prepare-device "$(jq -c --arg u "$UID1" '.[$u].devices[0] | [.requestNames, .poolName, .deviceName]' "$D/prepare1.json")" \
    "[[\"nic\"],\"$NODE\",\"$(name_of "$vf1")\"]"
expect_eq vf1-on-vfio "$(driver_of "$vf1") $(driver_of "$vf0")" "vfio-pci igbvf"
expect_eq lease-is-the-claims "$("$CTL" --json lease list | jq -c '[.[] | {owner, functions}]')" \
    "[{\"owner\":\"k8s:$UID1\",\"functions\":[\"$vf1\"]}]"
SPEC="$K/cdi/passthroughd.io-vfio_$UID1.json"
check cdi-spec-written test -f "$SPEC"
expect_eq cdi-version "$(jq -r .cdiVersion "$SPEC")" 0.5.0
check cdi-has-group-node jq -e --arg g "/dev/vfio/$(group_of "$vf1")" '[.devices[].containerEdits.deviceNodes[]?.path] | index($g)' "$SPEC"
check cdi-has-container-node jq -e '[.devices[].containerEdits.deviceNodes[]?.path] | index("/dev/vfio/vfio")' "$SPEC"
# Every CDI id of the answer names a device of the spec.
expect_eq cdi-ids-resolve "$(jq -r --arg u "$UID1" '.[$u].devices[0].cdiDeviceIds[]' "$D/prepare1.json" | sed 's/^passthroughd.io\/vfio=//' | sort | tr '\n' ' ')" \
    "$(jq -r '.devices[].name' "$SPEC" | sort | tr '\n' ' ')"
iommufd="$(ls "$SYS/$vf1/vfio-dev" 2>/dev/null | head -n1)"
if [ -n "$iommufd" ]; then
    check cdi-has-iommufd-node jq -e --arg n "/dev/vfio/devices/$iommufd" '[.devices[].containerEdits.deviceNodes[]?.path] | index($n)' "$SPEC"
else
    note "this kernel offers no iommufd device node for $vf1"
fi
# The metadata file, mounted where KubeVirt reads it, decodes to the VF's address.
meta_host="$(jq -r '.devices[].containerEdits.mounts[]?.hostPath' "$SPEC")"
meta_ctr="$(jq -r '.devices[].containerEdits.mounts[]?.containerPath' "$SPEC")"
expect_eq metadata-container-path "$meta_ctr" \
    "/var/run/kubernetes.io/dra-device-attributes/resourceclaims/vm1-nic/nic/$DRIVER-metadata.json"
# Readable by KubeVirt's launcher, which is not root.
expect_eq metadata-and-spec-mode-644 "$(stat -c %a "$meta_host" "$SPEC" | tr '\n' ' ')" "644 644 "
expect_eq metadata-decodes-to-vf1 "$(jq -r 'select(.apiVersion == "metadata.resource.k8s.io/v1alpha1" and .kind == "DeviceMetadata") | .requests[].devices[].attributes["resource.kubernetes.io/pciBusID"].string' "$meta_host" | head -n1)" "$vf1"
check slice-shows-vf1-taken wait_for '[ "$(free_of "$vf1")" = false ]' 30
cp "$SPEC" "$D/spec1.json"

# 4. Again: the same answer (and v1beta1 the same).
"$KUBELET" prepare "$EP" vms vm1-nic "$UID1" >"$D/prepare2.json"
expect_eq prepare-again-same "$(cat "$D/prepare2.json")" "$(cat "$D/prepare1.json")"
"$KUBELET" --v1beta1 prepare "$EP" vms vm1-nic "$UID1" >"$D/prepare2b.json"
expect_eq prepare-v1beta1-same "$(cat "$D/prepare2b.json")" "$(cat "$D/prepare1.json")"
note "a repeated prepare: $(plugin_ms 2) ms in the plugin"

# The plugin's memory, idle after a prepare.
sleep 1
note "plugin idle memory: $(awk '/VmRSS/{print $2, $3}' /proc/"$(plugin_pid)"/status)"

# 5. Restart both: the daemon cleanly, the plugin killed (its sockets stay, stale).
stop_daemon
check daemon-restarts start_daemon
kill -9 "$(plugin_pid)"
wait_for '! alive '"$(plugin_pid)" 10
check stale-sockets-left test -S "$REG" -a -S "$EP"
check plugin-restarts start_plugin
"$KUBELET" register "$K/registry" >"$D/register2.json" 2>"$D/register2.err"
expect_eq register-after-restart "$?" 0
"$KUBELET" prepare "$EP" vms vm1-nic "$UID1" >"$D/prepare3.json"
expect_eq prepare-after-restart-same "$(cat "$D/prepare3.json")" "$(cat "$D/prepare1.json")"
expect_eq lease-after-restart "$("$CTL" --json lease list | jq -r '.[].owner')" "k8s:$UID1"
expect_eq vf1-still-on-vfio "$(driver_of "$vf1")" vfio-pci

# 5b. The lease ended behind the plugin's back (as a reboot does, or an administrator): the VF
# is back on igbvf; kubelet's next prepare takes it again, with the nodes read from sysfs.
check lease-ended-by-hand "$CTL" lease end "k8s:$UID1"
check vf1-back-after-hand-end wait_for '[ "$(driver_of "$vf1")" = igbvf ]' 10
"$KUBELET" prepare "$EP" vms vm1-nic "$UID1" >"$D/prepare4.json"
expect_eq prepare-after-lease-end-same "$(cat "$D/prepare4.json")" "$(cat "$D/prepare1.json")"
expect_eq vf1-on-vfio-again "$(driver_of "$vf1")" vfio-pci
expect_eq lease-taken-again "$("$CTL" --json lease list | jq -r '.[].owner')" "k8s:$UID1"
check cdi-group-matches-sysfs jq -e --arg g "/dev/vfio/$(group_of "$vf1")" '[.devices[].containerEdits.deviceNodes[]?.path] | index($g)' "$SPEC"

# 6. A VF leased to a VM (the libvirt hook) is refused to a claim and left as it was.
domain="<domain type='qemu'><name>vm9</name><devices>$("$CTL" show "$vf0" --libvirt)</devices></domain>"
t0="${EPOCHREALTIME/./}"
printf '%s' "$domain" | "$CTL" libvirt-hook vm9 prepare begin - >/dev/null 2>&1
t1="${EPOCHREALTIME/./}"
note "for comparison, the libvirt hook's lease of one VF: $(( (t1 - t0) / 1000 )) ms"
expect_eq vm9-leases-vf0 "$(driver_of "$vf0")" vfio-pci
UID2=22222222-2222-3333-4444-555555555555
check claim2-created post /apis/resource.k8s.io/v1/namespaces/vms/resourceclaims "$(claim_json vm2-nic "$UID2" "$vf0")"
"$KUBELET" prepare "$EP" vms vm2-nic "$UID2" >"$D/prepare-vm-held.json"
err="$(jq -r --arg u "$UID2" '.[$u].error' "$D/prepare-vm-held.json")"
note "claim for a VM's VF: $err"
check refusal-names-vm grep -q "libvirt:vm9" <<<"$err"
expect_eq refused-claim-no-devices "$(jq -r --arg u "$UID2" '.[$u].devices | length' "$D/prepare-vm-held.json")" 0
expect_eq vf0-still-vms "$(driver_of "$vf0") $("$CTL" --json lease list | jq -r '[.[].owner] | sort | join(",")')" \
    "vfio-pci k8s:$UID1,libvirt:vm9"
check no-spec-for-refused test ! -e "$K/cdi/passthroughd.io-vfio_$UID2.json"
printf '%s' "$domain" | "$CTL" libvirt-hook vm9 release end - >/dev/null 2>&1

# 7. Unprepare (the claim already deleted in the API server): the VF goes back, files go.
curl -sf -X DELETE "$URL/apis/resource.k8s.io/v1/namespaces/vms/resourceclaims/vm1-nic" >/dev/null
"$KUBELET" unprepare "$EP" vms vm1-nic "$UID1" >"$D/unprepare.json"
check unprepare-ok answered "$D/unprepare.json" "$UID1"
check vf1-back-on-igbvf wait_for '[ "$(driver_of "$vf1")" = igbvf ]' 10
expect_eq no-leases "$("$CTL" --json lease list | jq -c .)" "[]"
check spec-gone test ! -e "$SPEC"
check metadata-gone test ! -e "$meta_host" -a ! -e "$K/plugins/$DRIVER/metadata/$UID1"
check claim-record-gone test ! -e "$K/state/claims/$UID1.json"
"$KUBELET" unprepare "$EP" vms vm1-nic "$UID1" >"$D/unprepare2.json"
check unprepare-unknown-ok answered "$D/unprepare2.json" "$UID1"
check slice-shows-vf1-free-again wait_for '[ "$(free_of "$vf1")" = true ]' 30

# 8. SIGTERM: the plugin removes its sockets (kubelet deregisters it).
kill "$(plugin_pid)"
check plugin-stops wait_for '! alive '"$(plugin_pid)" 10
check sockets-removed test ! -e "$REG" -a ! -e "$EP"
kill "$api_pid" 2>/dev/null
stop_daemon
finish
