mod cli;
mod delivery;
mod helpers;
mod poison;
mod restart;
