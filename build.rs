//! Compiles every `csrc/*.cu` ahead of time with nvcc (through the `cc` crate), links the CUDA
//! runtime statically, and generates the Rust bindings of the one C header `csrc/braidinfer.h`.
//!
//! Toolkit search order: `CUDA_HOME` (or `CUDA_PATH`), `nvcc` on `PATH`, then the toolchain that
//! `make setup` installs into `.toolchain/cuda/nvidia/cu13`.
//! Targets: `BRAIDINFER_CUDA_ARCH`, a comma-separated list of `sm_XY[a]` (machine code) and
//! `compute_XY[a]` (PTX); default `sm_90a,compute_90`.

use std::env;
use std::path::{Path, PathBuf};

const DEFAULT_ARCH: &str = "sm_90a,compute_90";
const HEADER: &str = "csrc/braidinfer.h";

fn main() {
    println!("cargo:rerun-if-changed=csrc");
    println!("cargo:rerun-if-env-changed=BRAIDINFER_CUDA_ARCH");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    println!("cargo:rerun-if-env-changed=CUDA_PATH");

    let cuda_home = match find_cuda_home() {
        Some(home) => home,
        None => panic!(
            "\n\nbraidinfer: no CUDA toolkit found (looked at CUDA_HOME, CUDA_PATH, nvcc on PATH and \
             .toolchain/cuda).\nRun `make setup` to install the CUDA 13.0 compiler from PyPI into \
             this project, or set CUDA_HOME to a CUDA 13 toolkit.\n\n"
        ),
    };
    let nvcc = cuda_home.join("bin").join("nvcc");
    let include = cuda_home.join("include");

    compile_kernels(&nvcc, &include);
    link_cuda_runtime(&cuda_home);
    generate_bindings(&include);
}

fn find_cuda_home() -> Option<PathBuf> {
    let has_nvcc = |home: &Path| home.join("bin").join("nvcc").is_file();
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(home) = env::var_os(var).map(PathBuf::from) {
            if has_nvcc(&home) {
                return Some(home);
            }
        }
    }
    let on_path = env::var_os("PATH").and_then(|paths| {
        env::split_paths(&paths)
            .find(|dir| dir.join("nvcc").is_file())
            .and_then(|bin| bin.parent().map(Path::to_path_buf))
    });
    if let Some(home) = on_path.filter(|home| has_nvcc(home)) {
        return Some(home);
    }
    let project =
        PathBuf::from(env::var("CARGO_MANIFEST_DIR").ok()?).join(".toolchain/cuda/nvidia/cu13");
    has_nvcc(&project).then_some(project)
}

/// `sm_90a` -> machine code for that chip; `compute_90` -> PTX the driver can compile later.
fn gencode_flags(arch_list: &str) -> Vec<String> {
    arch_list
        .split(',')
        .map(str::trim)
        .filter(|arch| !arch.is_empty())
        .map(|arch| {
            if let Some(version) = arch.strip_prefix("sm_") {
                format!("-gencode=arch=compute_{version},code=sm_{version}")
            } else if arch.starts_with("compute_") {
                format!("-gencode=arch={arch},code={arch}")
            } else {
                panic!("BRAIDINFER_CUDA_ARCH: '{arch}' is neither sm_XY nor compute_XY");
            }
        })
        .collect()
}

fn compile_kernels(nvcc: &Path, include: &Path) {
    let arch_list = env::var("BRAIDINFER_CUDA_ARCH").unwrap_or_else(|_| DEFAULT_ARCH.to_string());
    let mut sources: Vec<PathBuf> = std::fs::read_dir("csrc")
        .expect("reading csrc/")
        .map(|entry| entry.expect("reading csrc/").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "cu"))
        .collect();
    sources.sort();

    // cc picks the CUDA compiler from NVCC (a plain `.compiler()` would be taken for gcc).
    env::set_var("NVCC", nvcc);
    let mut build = cc::Build::new();
    build
        .cuda(true)
        // Cargo's debug info setting would add -G (device debug, no optimization).
        .debug(false)
        .include("csrc")
        .include(include)
        .flag("-std=c++17")
        .flag("-O3")
        .flag("-lineinfo")
        .flag("--expt-relaxed-constexpr")
        // Every binary embeds the kernels; compressed, the GPU bundle stays small.
        .flag("--compress-mode=size")
        .flag("-Xcompiler=-Wall")
        .warnings(false)
        .files(&sources);
    for flag in gencode_flags(&arch_list) {
        build.flag(&flag);
    }
    build.compile("braidinfer_kernels");
}

fn link_cuda_runtime(cuda_home: &Path) {
    for dir in ["lib64", "lib", "lib/x64"] {
        let path = cuda_home.join(dir);
        if path.join("libcudart_static.a").is_file() {
            println!("cargo:rustc-link-search=native={}", path.display());
        }
    }
    // cudart_static opens libcuda.so itself at run time: no link-time dependency on the driver.
    println!("cargo:rustc-link-lib=static=cudart_static");
    for lib in ["dl", "rt", "pthread", "stdc++"] {
        println!("cargo:rustc-link-lib={lib}");
    }
}

fn generate_bindings(include: &Path) {
    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR")).join("bindings.rs");
    bindgen::Builder::default()
        .header(HEADER)
        .clang_arg(format!("-I{}", include.display()))
        .allowlist_function("bi_.*")
        .allowlist_type("bi_.*")
        .allowlist_var("BI_.*")
        .default_enum_style(bindgen::EnumVariation::Consts)
        .layout_tests(false)
        .generate()
        .expect("bindgen failed on csrc/braidinfer.h")
        .write_to_file(&out)
        .expect("writing bindings.rs");
}
