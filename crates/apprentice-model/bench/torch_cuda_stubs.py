#!/usr/bin/env python3
"""Makes PyPI's CUDA build of torch import on a machine without the CUDA wheels, for the
transformers baseline of `apprentice bench model` when the CPU-only index
(https://download.pytorch.org/whl/cpu) cannot be reached.

`pip install torch` from PyPI pulls ~3 GB of nvidia-* wheels that a CPU run never calls. Instead:
`pip install --no-deps torch` (plus filelock typing-extensions sympy networkx jinja2 fsspec), then
run this script: it builds a link-only stub (gcc) for every CUDA library torch's shared objects
need and is missing, exporting exactly the symbols (and symbol versions) they import, and puts the
stubs in torch/lib. Every stub function returns an error code (the device count is 0), so
`torch.cuda.is_available()` is False, exactly as on a GPU-less machine. The CPU kernels (MKL,
oneDNN) are the same code the CPU-only wheel ships. Rerunning rebuilds the stubs.
"""
import collections, os, re, subprocess, sys, sysconfig
tl = os.path.join(sysconfig.get_paths()['purelib'], 'torch', 'lib')
libs = [os.path.join(tl, f) for f in os.listdir(tl) if '.so' in f]
def is_stub(path):
    return '__stub_error' in subprocess.run(['nm', '-D', path], capture_output=True, text=True).stdout
stubs_present = {os.path.basename(l) for l in libs if is_stub(l)}
libs = [l for l in libs if os.path.basename(l) not in stubs_present]
libs.append([os.path.join(tl, '..', f) for f in os.listdir(os.path.join(tl, '..')) if f.startswith('_C') and f.endswith('.so')][0])
def dynsyms(path):
    out = subprocess.run(['readelf', '--dyn-syms', '-W', path], capture_output=True, text=True).stdout
    for line in out.splitlines():
        p = line.split()
        if len(p) >= 8 and p[0].endswith(':'):
            yield p[6], p[4], p[7]
needed = set()
for l in libs:
    out = subprocess.run(['readelf', '-d', l], capture_output=True, text=True).stdout
    needed |= set(re.findall(r'NEEDED.*\[(.*)\]', out))
present = set(os.listdir(tl)) - stubs_present
system = []
for n in needed - present:
    r = subprocess.run(['sh', '-c', f'ldconfig -p | grep -q "{n} "'])
    if r.returncode == 0:
        system.append(n)
missing = sorted(needed - present - set(system))
print('missing', missing, file=sys.stderr)
defined = set()
for l in libs:
    for ndx, bind, name in dynsyms(l):
        if ndx != 'UND':
            defined.add(name.split('@')[0])
sysdefs = set()
for n in system + ['libc.so.6', 'libm.so.6', 'libstdc++.so.6', 'libgcc_s.so.1']:
    path = subprocess.run(['sh', '-c', f"ldconfig -p | grep '{n} ' | grep x86-64 | head -1 | sed 's/.*=> //'"], capture_output=True, text=True).stdout.strip()
    if path:
        for ndx, bind, name in dynsyms(path):
            if ndx != 'UND':
                sysdefs.add(name.split('@')[0])
by_lib = collections.defaultdict(set)
version_of = {'NVSHMEM': 'libnvshmem_host.so.3'}
for l in libs:
    for ndx, bind, name in dynsyms(l):
        if ndx != 'UND' or bind == 'WEAK':
            continue
        base, _, ver = name.partition('@')
        ver = ver.split(' ')[0]
        if ver:
            soname = version_of.get(ver, ver)
            if soname in missing:
                by_lib[soname].add((base, ver))
        elif base and base not in defined and base not in sysdefs and re.match(r'^(cu[A-Z]|cusparseLt|nccl)', base):
            by_lib['__unversioned__'].add((base, ''))

MESSAGE = '"CUDA is not available (CPU-only torch: CUDA libraries replaced by link stubs)"'
SPECIAL = {
    'cudaGetDeviceCount': 'int cudaGetDeviceCount(int *n) { if (n) *n = 0; return 100; }',
    'cudaGetDevice': 'int cudaGetDevice(int *d) { if (d) *d = 0; return 100; }',
    'cudaGetLastError': 'int cudaGetLastError(void) { return 0; }',
    'cudaPeekAtLastError': 'int cudaPeekAtLastError(void) { return 0; }',
    'cudaDriverGetVersion': 'int cudaDriverGetVersion(int *v) { if (v) *v = 0; return 0; }',
    'cudaRuntimeGetVersion': 'int cudaRuntimeGetVersion(int *v) { if (v) *v = 13020; return 0; }',
    'cuGetErrorString': 'int cuGetErrorString(int e, const char **s) { if (s) *s = ' + MESSAGE + '; return 0; }',
    'cuGetErrorName': 'int cuGetErrorName(int e, const char **s) { if (s) *s = "CUDA_ERROR_NO_DEVICE"; return 0; }',
    'cuDevicePrimaryCtxGetState': 'int cuDevicePrimaryCtxGetState(int d, unsigned *f, int *a) { if (f) *f = 0; if (a) *a = 0; return 100; }',
    'ncclGetLastError': 'const char *ncclGetLastError(void *c) { return ' + MESSAGE + '; }',
}
def stub(name):
    if name in SPECIAL:
        return SPECIAL[name]
    if re.search(r'(Error|Status)(String|Name)$', name):
        return f'const char *{name}(void) {{ return {MESSAGE}; }}'
    return f'int {name}(void) {{ return 999; }}'
out_dir = tl
for soname in missing:
    syms = by_lib.get(soname, set())
    if soname == 'libcudart.so.13':
        syms = syms | by_lib['__unversioned__']
    vers = sorted({v for _, v in syms if v})
    c = ['int __stub_error(void) { return 999; }']
    for s, _ in sorted(syms):
        c.append(stub(s))
    build = os.path.join(os.path.dirname(tl), '_cuda_stub_sources')
    os.makedirs(build, exist_ok=True)
    src = os.path.join(build, soname + '.c')
    open(src, 'w').write('\n'.join(c) + '\n')
    vs = os.path.join(build, soname + '.map')
    if vers:
        body = ''.join(f'{v} {{ global: {"; ".join(s for s, vv in sorted(syms) if vv == v)}; }};\n' for v in vers)
        unv = [s for s, vv in syms if not vv]
        if unv:
            body = body.replace('; };', '; ' + '; '.join(sorted(unv)) + '; };', 1)
    else:
        body = 'STUB { global: *; };\n'
    open(vs, 'w').write(body)
    subprocess.run(['gcc', '-shared', '-fPIC', '-O1', '-o', os.path.join(out_dir, soname), src,
                    f'-Wl,-soname,{soname}', f'-Wl,--version-script,{vs}'], check=True)
    print(soname, len(syms), 'symbols', file=sys.stderr)
