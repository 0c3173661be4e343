# Sourced by the benchmark scripts: the disk's write bound, as bench/RESULTS.md quotes it.
# fio_best prints fio's best durable sequential write in MiB/s on the disk of $work (O_DIRECT,
# fdatasync after each write; 512 KiB, 1 MiB and 4 MiB writes at queue depth 1 and 4), and
# each size's figure on stderr. It is the best the hardware does, not the write size pyralog
# happens to use: on these disks 4 MiB writes sync at up to twice the rate of 512 KiB ones.
fio_mib() { # fio flags...: MiB/s written
  fio --output-format=json --directory="$work" --name=w --size=1g --direct=1 --rw=write --fdatasync=1 "$@" \
    | python3 -c 'import json,sys; print(round(json.load(sys.stdin)["jobs"][0]["write"]["bw_bytes"]/1048576))'
  rm -f "$work"/w.*
}
fio_best() {
  local best=0 mib bs
  for bs in 512k 1m 4m; do
    mib=$(fio_mib --ioengine=psync --bs="$bs"); echo "  fio $bs qd 1: $mib MiB/s" >&2
    ((mib > best)) && best=$mib
    mib=$(fio_mib --ioengine=libaio --iodepth=4 --bs="$bs"); echo "  fio $bs qd 4: $mib MiB/s" >&2
    ((mib > best)) && best=$mib
  done
  echo "$best"
}
