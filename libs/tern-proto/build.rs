//! Compiles the tern.v1 contracts in proto/ (the single include root) into OUT_DIR.
//! Needs `protoc`, which `make` installs from Debian's protobuf-compiler package.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = "../../proto";
    let files = [
        "event.proto",
        "registry.proto",
        "identity.proto",
        "store.proto",
    ]
    .map(|f| format!("{root}/tern/v1/{f}"));
    // The descriptor set is what gRPC server reflection serves.
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("tern_descriptor.bin"))
        .compile_protos(&files, &[root.to_string()])?;
    println!("cargo:rerun-if-changed={root}");
    Ok(())
}
