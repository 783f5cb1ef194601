//! The LeaseService wire types and stubs, generated from
//! `proto/lease_service.proto` by `build.rs`.

#![allow(clippy::all, missing_docs)]

tonic::include_proto!("lease");
