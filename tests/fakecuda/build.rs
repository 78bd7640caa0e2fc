//! The library is built as `libfakecuda.so` but carries the SONAME `libcuda.so`: once a
//! test has loaded it by path, glibc's `dlopen("libcuda.so")` (what cudarc does) matches
//! the already-loaded object by that name instead of searching for the real driver.
fn main() {
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libcuda.so");
}
