//! Compiles the tern.v1 contracts in proto/ (the single include root) into OUT_DIR.
//! Needs `protoc`, which `make` installs from Debian's protobuf-compiler package.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = "../../proto";
    let files =
        ["event.proto", "registry.proto", "identity.proto"].map(|f| format!("{root}/tern/v1/{f}"));
    tonic_prost_build::configure().compile_protos(&files, &[root.to_string()])?;
    println!("cargo:rerun-if-changed={root}");
    Ok(())
}
