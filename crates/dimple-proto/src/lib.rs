//! The wire contract of the Dimple serving cluster: tonic/prost code generated from
//! `proto/` at build time (`v1`: the public `dimple.v1.Dimple` service; `worker`: the
//! internal `dimple.worker.v1.Worker` service), the conversions between those messages and
//! the core types (`convert`), the record a worker registers in etcd (`discovery`), the cause a
//! failed worker call carries (`failure`), the sockets of a server (`listeners`), TLS inside the
//! cluster (`tls`), and what every server exposes besides gRPC
//! (`telemetry`: metric names and the `/metrics` HTTP endpoint).
//!
//! Proto types stop at the service edge: a request is converted once, by the `TryFrom`
//! impls in [`convert`], and everything behind it uses the converted types.

pub mod assets;
pub mod convert;
pub mod deadline;
pub mod discovery;
pub mod failure;
pub mod listeners;
pub mod telemetry;
pub mod tls;

/// Generated code, in modules that mirror the proto packages.
pub mod pb {
    pub mod dimple {
        pub mod v1 {
            #![allow(clippy::all)]
            tonic::include_proto!("dimple.v1");
        }
        pub mod worker {
            pub mod v1 {
                #![allow(clippy::all)]
                tonic::include_proto!("dimple.worker.v1");
            }
        }
    }
}

pub use pb::dimple::v1;
pub use pb::dimple::worker::v1 as worker;

/// The encoded `FileDescriptorSet` of every proto file, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/dimple_descriptor.bin"));
